"""TRL's DPO options through the trainer's loss function (rlhf_jax.algos.preference) on a tiny model.

The ops are checked against TRL itself in tests/ops/test_dpo_options_trl_parity.py; here: the options
reach the loss (sft term = token-mean NLL computed independently, ld_alpha = 1 and rpo_alpha = 0 are plain
DPO, LD reference values under chunking), every option trains jitted, and the config keys validate.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import optax
import pytest

from rlhf_jax import ops
from rlhf_jax.algos import preference as pref
from rlhf_jax.config import ConfigError, from_dict
from rlhf_jax.train import reference as pc
from rlhf_jax.train.state import init_train_state
from rlhf_jax.train.step import make_train_step
sys.path.insert(0, str(pathlib.Path(__file__).parent))  # importlib mode: make the sibling module importable
from test_dpo import B, attach_ref, model_and_params, stream  # noqa: E402, F401 (fixture)

L = pref.PreferenceLossConfig


def _loss(model, params, batch, loss):
    (s, n), aux = jax.jit(pref.make_loss_fn(model, loss))(params, batch, None)
    return float(s) / float(n), aux


@pytest.fixture(scope="module")
def batch(model_and_params):
    model, params = model_and_params
    ref_params = jax.tree.map(lambda x: x * 0.9, params)
    return attach_ref(model, ref_params, next(stream("preference")))


def test_rpo_alpha_adds_the_token_mean_nll_of_the_chosen_completions(model_and_params, batch):
    model, params = model_and_params
    ids, mask, lmask = (np.asarray(x) for x in pref.stacked_rows(batch))
    logits = model.apply({"params": params}, ids, mask)[:, :-1]
    tok = np.asarray(ops.token_logprobs(logits, ids[:, 1:]))
    m = lmask[:, 1:]
    nll = -(tok[:B] * m[:B]).sum() / m[:B].sum()  # TRL: -chosen_per_token_logps[chosen_mask].mean()
    plain, _ = _loss(model, params, batch, L(beta=0.2))
    rpo, _ = _loss(model, params, batch, L(beta=0.2, rpo_alpha=0.7))
    np.testing.assert_allclose(rpo - plain, 0.7 * nll, rtol=1e-5)
    listed, _ = _loss(model, params, batch, L(beta=0.2, loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.7)))
    np.testing.assert_allclose(listed, rpo, rtol=1e-6)
    zero, _ = _loss(model, params, batch, L(beta=0.2, rpo_alpha=0.0))
    np.testing.assert_allclose(zero, plain, rtol=1e-6)


def test_ld_alpha_one_is_plain_dpo_and_chunked_reference_keeps_pairs(model_and_params, batch):
    model, params = model_and_params
    ref_params = jax.tree.map(lambda x: x * 0.9, params)
    plain, _ = _loss(model, params, batch, L(beta=0.2))
    ld1, _ = _loss(model, params, batch, L(beta=0.2, ld_alpha=1.0))
    np.testing.assert_allclose(ld1, plain, rtol=1e-5)
    whole = jax.jit(lambda p: pc.reference_logps(model, p, batch, ld_alpha=0.3))(ref_params)
    chunked = jax.jit(lambda p: pc.reference_logps(model, p, batch, num_chunks=2, ld_alpha=0.3))(ref_params)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)
    ids, mask, lmask = pref.stacked_rows(batch)
    logits = model.apply({"params": ref_params}, ids, mask)[:, :-1]
    want = ops.ld_logps(ops.token_logprobs(logits, ids[:, 1:]), lmask[:, 1:], ld_alpha=0.3)
    np.testing.assert_allclose(whole, np.stack([want[:B], want[B:]], 1), rtol=1e-5)
    assert not np.allclose(whole, pc.reference_logps(model, ref_params, batch))  # tails are really reweighted


OPTIONS = [L(beta=0.2, loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0)),  # MPO
           L(beta=0.2, rpo_alpha=1.0), L(beta=0.2, use_weighting=True), L(beta=0.2, ld_alpha=0.5),
           L(beta=0.2, loss_type=("ipo", "sft"), use_weighting=True, ld_alpha=0.2)]


@pytest.mark.parametrize("loss", OPTIONS, ids=lambda c: f"{c.resolved_loss_type}-w{c.use_weighting}-ld{c.ld_alpha}")
def test_every_option_trains_jitted(model_and_params, batch, loss):
    model, params = model_and_params
    tx = optax.adam(3e-3)
    step = make_train_step(pref.make_loss_fn(model, loss, completion_width=8), tx=tx, num_micro_batches=2,
                           donate=False)
    state = init_train_state(params, tx)
    history = []
    for _ in range(4):
        state, m = step(state, batch, jax.random.key(0))
        assert bool(m.finite) and float(m.count) == B
        history.append(float(m.loss))
    assert history[-1] < history[0], history
    assert step._cache_size() == 1


def test_wpo_weights_scale_the_loss(model_and_params, batch):
    model, params = model_and_params
    plain, _ = _loss(model, params, batch, L(beta=0.2))
    wpo, _ = _loss(model, params, batch, L(beta=0.2, use_weighting=True))
    assert 0 < wpo < plain  # weights are products of two probabilities-like factors in (0, 1]


def test_config_keys_validate_and_parse():
    cfg = from_dict(L, {"loss_type": "[sigmoid, bco_pair, sft]", "loss_weights": [0.8, 0.2, 1.0]})
    assert cfg.loss_type == ("sigmoid", "bco_pair", "sft") and cfg.dpo_loss_weights == (0.8, 0.2, 1.0)
    assert L(rpo_alpha=0.5).dpo_loss_types == ("sigmoid", "sft") and L(rpo_alpha=0.5).dpo_loss_weights == (1.0, 0.5)
    assert not L().dpo_options and L().dpo_loss_weights is None
    for kw, key in [({"loss_type": ("sigmoid", "nope")}, "loss.loss_type"),
                    ({"loss_type": ("sigmoid", "sft"), "loss_weights": (1.0,)}, "loss.loss_weights"),
                    ({"ld_alpha": 1.5}, "loss.ld_alpha"), ({"rpo_alpha": -1.0}, "loss.rpo_alpha"),
                    ({"use_weighting": True, "loss_type": "aot"}, "loss.use_weighting"),
                    ({"algorithm": "simpo", "rpo_alpha": 1.0}, "loss.rpo_alpha"),
                    ({"algorithm": "kto", "use_weighting": True}, "loss.use_weighting")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            L(**kw)


def _kl_completion_of(batch, row):
    """Tokens of KL row `row` under its loss mask."""
    return [int(t) for t, m in zip(np.asarray(batch.kl_ids_BxS[row]), np.asarray(batch.kl_loss_mask_BxS[row])) if m]


def test_kto_batch_kl_pairs_rotate_within_the_global_batch_as_trl():
    from rlhf_jax.data import BatchIterator, DataConfig

    from test_dpo import S, synthetic_data

    data = synthetic_data("unpaired", n=8)
    cfg = DataConfig(max_prompt_len=8, max_seq_len=S, buckets=(S,), shuffle=True, shuffle_seed=3)
    one = pc.RefStream(BatchIterator(data, cfg, batch_size=4, pad_id=0), kl_pairs="batch")
    b = next(one)
    order = one.inner.epoch_order(0)[:4]
    for row in range(4):  # TRL add_kl_completion_ids: (x_1, y_B), (x_2, y_1), ..., (x_B, y_{B-1})
        assert _kl_completion_of(b, row) == [int(t) for t in data.completion_ids[int(order[row - 1])][0]]
    # two processes of 2 rows each see the same global pairing as one process of 4
    halves = [next(pc.RefStream(BatchIterator(data, cfg, batch_size=2, pad_id=0, process_index=p, process_count=2),
                                kl_pairs="batch")) for p in (0, 1)]
    assert [_kl_completion_of(h, r) for h in halves for r in range(2)] == [_kl_completion_of(b, r) for r in range(4)]
    # the default keeps the per-dataset-row pairing (i + 1) mod N
    d = next(pc.RefStream(BatchIterator(data, cfg, batch_size=4, pad_id=0)))
    assert _kl_completion_of(d, 0) == [int(t) for t in data.completion_ids[(int(order[0]) + 1) % 8][0]]
    with pytest.raises(ValueError, match="cannot be precomputed"):
        pc.RefStream(BatchIterator(data, cfg, batch_size=4, pad_id=0), np.zeros((8, 2)), kl_pairs="batch")
    with pytest.raises(ConfigError, match="loss.kto_kl_pairs"):
        L(algorithm="dpo", kto_kl_pairs="batch")


def test_orpo_trl_sft_matches_trl_orpo_trainer(model_and_params, batch):
    """``orpo_sft: trl`` against TRL's own ORPOTrainer.concatenated_forward + odds_ratio_loss, run on the
    logits of our model for the same rows (TRL's NLL covers the prompt tokens too)."""
    import types

    torch = pytest.importorskip("torch")
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    model, params = model_and_params
    ids, mask, lmask = (np.asarray(x) for x in pref.stacked_rows(batch))
    logits = torch.tensor(np.asarray(model.apply({"params": params}, ids, mask)), dtype=torch.float32)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    labels = np.where(lmask > 0, ids, -100)
    trl_batch = {"chosen_input_ids": t(ids[:B]), "chosen_attention_mask": t(mask[:B]), "chosen_labels": t(labels[:B]),
                 "rejected_input_ids": t(ids[B:]), "rejected_attention_mask": t(mask[B:]),
                 "rejected_labels": t(labels[B:])}
    T = orpo.ORPOTrainer
    fake = types.SimpleNamespace(is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False, beta=0.2,
                                 accelerator=types.SimpleNamespace(device="cpu"),
                                 concatenated_inputs=T.concatenated_inputs, get_batch_logps=T.get_batch_logps)
    out = T.concatenated_forward(fake, lambda *a, **k: types.SimpleNamespace(logits=logits), trl_batch)
    losses = T.odds_ratio_loss(fake, out[0], out[1])[0]
    want = float(out[4] - losses.mean())  # TRL: loss = policy_nll_loss - losses.mean()
    got, aux = _loss(model, params, batch, L(algorithm="orpo", beta=0.2, orpo_sft="trl"))
    np.testing.assert_allclose(got, want, rtol=2e-5)
    default, _ = _loss(model, params, batch, L(algorithm="orpo", beta=0.2))
    assert abs(default - got) > 1e-4  # the default (per-row completion mean) is a different quantity
