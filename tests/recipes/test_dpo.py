"""Tests for the offline preference trainers (rlhf_jax.recipes.dpo / preference_common).

Unit level (one tiny model shape shared by every test): each loss type takes jitted steps and lowers its
loss; the 2B-row forward equals per-row unpadded forwards; KTO's KL rows; no recompiles. Driver level:
the precomputed (cached) reference equals the live reference, exact resume, KTO end to end, configs.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import ops
from rlhf_jax.data.batching import pad_prompts
from rlhf_jax.config import ConfigError, load_config
from rlhf_jax.data import BatchIterator, DataConfig, DataStats, EncodedDataset
from rlhf_jax.models import ModelConfig, Transformer, init_params
from rlhf_jax.train.step import make_train_step
from rlhf_jax.recipes import dpo
from rlhf_jax.train import reference as pc
from rlhf_jax.algos import preference as pref
from rlhf_jax.algos import preference_rows as rows_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
V, S, B = 40, 16, 4


@pytest.fixture(scope="module")
def model_and_params():
    cfg = ModelConfig(model_type="llama", vocab_size=V, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=64, max_position_embeddings=64, norm_eps=1e-6, activation="silu")
    model = Transformer(cfg, head="lm")
    return model, init_params(model, jax.random.key(0))


def synthetic_data(kind: str, n: int = 8, seed: int = 0) -> EncodedDataset:
    """Random prompts (2-5 tokens) and completions (2-6 tokens), all fitting S."""
    rng = np.random.default_rng(seed)
    tok = lambda lo, hi: rng.integers(2, V, size=int(rng.integers(lo, hi + 1))).astype(np.int32)  # noqa: E731
    prompts = [tok(2, 5) for _ in range(n)]
    k = 2 if kind == "preference" else 1
    completions = [tuple(tok(2, 6) for _ in range(k)) for _ in range(n)]
    labels = np.array([i % 2 for i in range(n)], np.int32) if kind == "unpaired" else None
    return EncodedDataset(kind=kind, prompt_ids=prompts, completion_ids=completions, labels=labels,
                          row_index=np.arange(n), rows=None, stats=DataStats(source=f"synthetic-{kind}"))


def stream(kind: str, ref=None) -> pc.RefStream:
    cfg = DataConfig(max_prompt_len=8, max_seq_len=S, buckets=(S,), shuffle=False)
    return pc.RefStream(BatchIterator(synthetic_data(kind), cfg, batch_size=B, pad_id=0), ref)


_ATTACH = {}


def attach_ref(model, ref_params, batch):
    """Live reference values (one jitted attacher per batch kind, shared by the tests)."""
    kind = type(batch).__name__
    if kind not in _ATTACH:
        _ATTACH[kind] = jax.jit(lambda p, b: pc.with_ref(b, pc.reference_logps(model, p, b)))
    return _ATTACH[kind](ref_params, batch)


PAIR_LOSSES = ([pref.PreferenceLossConfig(algorithm="dpo", loss_type=t,
                                         label_smoothing=1e-3 if t == "exo_pair" else 0.0) for t in ops.DPO_LOSS_TYPES]
               + [pref.PreferenceLossConfig(algorithm="dpo", loss_type=t, f_divergence=f)
                  for f in ops.F_DIVERGENCES[1:] for t in ("sigmoid", "ipo")]
               + [pref.PreferenceLossConfig(algorithm="dpo", label_smoothing=0.2),
                  pref.PreferenceLossConfig(algorithm="dpo", loss_type="robust", label_smoothing=0.2),
                  pref.PreferenceLossConfig(algorithm="simpo", beta=2.0), pref.PreferenceLossConfig(algorithm="orpo")])
KTO_LOSSES = [pref.PreferenceLossConfig(algorithm="kto"),
              pref.PreferenceLossConfig(algorithm="kto", loss_type="apo_zero_unpaired", desirable_weight=1.5)]


def _name(loss: pref.PreferenceLossConfig) -> str:
    return "/".join(str(x) for x in (loss.algorithm, loss.resolved_loss_type, loss.f_divergence, loss.label_smoothing))


def switch_step(model, losses, from_logps):
    """ONE compiled train step for many losses: the shared forward/backward of the model, then
    `lax.switch` over each loss's `*_loss_from_logps` (what `make_loss_fn` composes statically)."""
    branches = [lambda lp, n, b, L=L: from_logps(lp, n, b, loss=L) for L in losses]

    def loss_fn(params, batch_and_index, key):
        batch, index_B = batch_and_index
        logp_2B, n_2B = pref.completion_logps(model, params, *pref.stacked_rows(batch))
        return jax.lax.switch(index_B[0], branches, logp_2B, n_2B, batch)

    return make_train_step(loss_fn, tx=optax.adam(3e-3), donate=False)


@pytest.mark.parametrize("kind, losses, from_logps", [
    ("preference", PAIR_LOSSES, pref.pair_loss_from_logps), ("unpaired", KTO_LOSSES, pref.kto_loss_from_logps)])
def test_every_loss_trains_jitted_without_recompiles(model_and_params, kind, losses, from_logps):
    from rlhf_jax.train.state import init_train_state

    model, params = model_and_params
    batch = attach_ref(model, params, next(stream(kind)))
    step = switch_step(model, losses, from_logps)
    failures = []
    for i, loss in enumerate(losses):
        state = init_train_state(params, optax.adam(3e-3))
        history = []
        for _ in range(4):
            state, m = step(state, (batch, jnp.full((B,), i, jnp.int32)), jax.random.key(0))
            history.append(float(m.loss))
            assert bool(m.finite) and float(m.count) == B, _name(loss)
        if not history[-1] < history[0]:
            failures.append((_name(loss), history))
        if loss.algorithm == "dpo" and loss.resolved_loss_type in ("sigmoid", "robust"):
            assert abs(history[0] - np.log(2)) < 1e-6, _name(loss)  # policy == reference: every margin is 0
    assert not failures, failures
    assert step._cache_size() == 1  # one trace for every loss and step


def test_make_loss_fn_equals_switch_branch_and_compiles_once(model_and_params):
    model, params = model_and_params
    batch = attach_ref(model, params, next(stream("preference")))
    loss = pref.PreferenceLossConfig(algorithm="dpo", loss_type="ipo", beta=0.2)
    step = make_train_step(pref.make_loss_fn(model, loss), tx=optax.adam(3e-3), donate=False)
    from rlhf_jax.train.state import init_train_state

    state = init_train_state(params, optax.adam(3e-3))
    losses = []
    for _ in range(3):
        state, m = step(state, batch, jax.random.key(0))
        losses.append(float(m.loss))
    assert losses[-1] < losses[0] and step._cache_size() == 1
    # the same batch values with another reference: still one trace
    step(state, attach_ref(model, state.params, batch), jax.random.key(1))
    assert step._cache_size() == 1


def test_pair_loss_matches_numpy_golden_from_independent_rows(model_and_params):
    """The 2B-row stacked forward equals scoring each sequence on its own (built independently, padded to a
    different width); the DPO sigmoid loss and accuracy then follow the numpy formula."""
    from rlhf_jax.data.batching import example_tokens

    model, params = model_and_params
    ref_params = jax.tree.map(lambda x: x + 0.01, params)
    s = stream("preference")
    batch = attach_ref(model, ref_params, next(s))
    d = s.inner.data
    width = S + 7
    seqs = [example_tokens(d.prompt_ids[i], d.completion_ids[i][k], completion_only_loss=True)
            for k in (0, 1) for i in range(B)]
    ids = np.zeros((2 * B, width), np.int32)
    mask, lmask = np.zeros_like(ids), np.zeros_like(ids)
    for r, (x, lm) in enumerate(seqs):
        ids[r, : len(x)], mask[r, : len(x)], lmask[r, : len(x)] = x, 1, lm

    @jax.jit
    def token_logps(p):
        logits = model.apply({"params": p}, ids, mask)
        return ops.token_logprobs(logits[:, :-1], ids[:, 1:])

    pol = np.sum(np.asarray(token_logps(params)) * lmask[:, 1:], axis=1)
    ref = np.sum(np.asarray(token_logps(ref_params)) * lmask[:, 1:], axis=1)
    np.testing.assert_allclose(batch.ref_chosen_logps_B, ref[:B], rtol=1e-5)
    np.testing.assert_allclose(batch.ref_rejected_logps_B, ref[B:], rtol=1e-5)
    loss = pref.PreferenceLossConfig(algorithm="dpo", beta=0.3)
    (loss_sum, pairs), aux = jax.jit(pref.make_loss_fn(model, loss))(params, batch, None)
    margin = (pol[:B] - ref[:B]) - (pol[B:] - ref[B:])
    assert float(pairs) == B and float(aux.correct) == np.sum(margin > 0)
    np.testing.assert_allclose(float(loss_sum) / B, np.mean(np.log1p(np.exp(-0.3 * margin))), rtol=1e-5)
    np.testing.assert_allclose(float(aux.chosen_logp), pol[:B].sum(), rtol=1e-5)


@pytest.mark.parametrize("kind", ["preference", "unpaired"])
def test_completion_window_equals_scoring_every_position(model_and_params, kind):
    """With the LM head on W = max completion length positions per row (rows with different prompt lengths,
    right padding; KTO's KL rows too), log-prob sums, counts and gradients equal the full-width forward."""
    model, params = model_and_params
    batch = next(stream(kind))
    rows = pref.stacked_rows(batch)
    lengths = np.asarray(rows[2]).sum(axis=1)
    assert len(set(np.argmax(np.asarray(rows[2]), axis=1).tolist())) > 1  # completions start at different slots
    width = 6  # synthetic completions have 2-6 tokens
    assert lengths.max() <= width < S - 1
    full = pref.completion_logps(model, params, *rows)
    window = jax.jit(lambda p: pref.completion_logps(model, p, *rows, completion_width=width))(params)
    np.testing.assert_allclose(window[0], full[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(window[1], full[1])
    np.testing.assert_array_equal(full[1], lengths)
    g_full = jax.grad(lambda p: jnp.sum(pref.completion_logps(model, p, *rows)[0]))(params)
    g_win = jax.grad(lambda p: jnp.sum(pref.completion_logps(model, p, *rows, completion_width=width)[0]))(params)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_win)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    # a window reaching past the row's end is clipped and masked, not wrapped around
    wide = pref.completion_logps(model, params, *rows, completion_width=S - 2)
    np.testing.assert_allclose(wide[0], full[0], rtol=1e-5, atol=1e-5)


def test_completion_width_follows_the_data_caps():
    assert dpo.completion_width(DataConfig(max_prompt_len=64, max_completion_len=64, max_seq_len=128)) == 64
    assert dpo.completion_width(DataConfig(max_prompt_len=64, max_completion_len=256, max_seq_len=128)) is None


def test_padding_pairs_count_zero(model_and_params):
    model, params = model_and_params
    batch = attach_ref(model, params, next(stream("preference")))
    zero = lambda x: x.at[2:].set(0)  # noqa: E731  rows 2, 3 become padding pairs (all masks 0)
    p = batch.pairs
    padded = batch._replace(pairs=p._replace(chosen_mask_BxS=zero(p.chosen_mask_BxS), chosen_loss_mask_BxS=zero(
        p.chosen_loss_mask_BxS), rejected_mask_BxS=zero(p.rejected_mask_BxS),
        rejected_loss_mask_BxS=zero(p.rejected_loss_mask_BxS)))
    fn = jax.jit(pref.make_loss_fn(model, pref.PreferenceLossConfig(beta=0.5)))
    moved = jax.tree.map(lambda x: x + 0.05, params)
    (full_sum, _), _ = fn(moved, jax.tree.map(lambda x: x[:2], batch), None)
    (pad_sum, n), aux = fn(moved, padded, None)
    assert float(n) == 2 and float(aux.pairs) == 2
    np.testing.assert_allclose(float(pad_sum), float(full_sum), rtol=1e-5)


def test_kto_stream_kl_rows_and_loss(model_and_params):
    model, params = model_and_params
    s = stream("unpaired")
    batch = next(s)
    d = s.inner.data
    assert isinstance(batch, pref.KTOBatch) and batch.kl_ids_BxS.shape == batch.rows.input_ids_BxS.shape
    for b in range(B):  # KL row b = prompt b + completion of row b + 1
        want = np.concatenate([d.prompt_ids[b], d.completion_ids[(b + 1) % len(d)][0]])
        np.testing.assert_array_equal(batch.kl_ids_BxS[b, : len(want)], want)
        assert batch.kl_loss_mask_BxS[b].sum() == len(d.completion_ids[(b + 1) % len(d)][0])
        assert batch.kl_mask_BxS[b].sum() == len(want)
    np.testing.assert_array_equal(batch.rows.label_B, [0, 1, 0, 1])
    moved = jax.tree.map(lambda x: x * 1.05, params)
    batch = attach_ref(model, params, batch)
    loss = pref.PreferenceLossConfig(algorithm="kto", beta=0.5, undesirable_weight=2.0)
    (loss_sum, rows), aux = jax.jit(pref.make_loss_fn(model, loss))(moved, batch, None)
    pol = attach_ref(model, moved, batch)  # policy sums via the same scorer
    u = np.asarray(pol.ref_logps_B) - np.asarray(batch.ref_logps_B)
    z0 = max(np.mean(np.asarray(pol.ref_kl_logps_B) - np.asarray(batch.ref_kl_logps_B)), 0.0)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    lab = np.asarray(batch.rows.label_B)
    want = np.where(lab == 1, 1 - sig(0.5 * (u - z0)), 2.0 * (1 - sig(0.5 * (z0 - u))))
    np.testing.assert_allclose(float(loss_sum) / float(rows), want.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux.kl) / B, z0, rtol=1e-5, atol=1e-7)


def test_precomputed_stream_fills_rows_in_dataset_order(model_and_params, tmp_path):
    model, params = model_and_params
    it = stream("preference").inner
    scores = jax.jit(lambda p, b: pc.reference_logps(model, p, b))

    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    ordered = BatchIterator(it.data, it.cfg, batch_size=3, pad_id=0, shuffle=False, drop_last=False, num_epochs=1)
    ref = pc.precompute_ref_logps(ordered, scores, params, mesh=mesh, cache_dir=tmp_path, key="k")
    assert ref.shape == (8, 2) and (tmp_path / "k.npy").exists()

    def boom(*_):
        raise AssertionError("cache not used")

    np.testing.assert_array_equal(pc.precompute_ref_logps(ordered, boom, params, mesh=mesh, cache_dir=tmp_path,
                                                          key="k"), ref)
    shuffled = BatchIterator(it.data, dataclasses.replace(it.cfg, shuffle=True), batch_size=B, pad_id=0)
    s = pc.RefStream(shuffled, ref)
    batch = next(s)
    live = attach_ref(model, params, batch)
    np.testing.assert_allclose(batch.ref_chosen_logps_B, live.ref_chosen_logps_B, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batch.ref_rejected_logps_B, live.ref_rejected_logps_B, rtol=1e-6, atol=1e-6)


def test_micro_batched_reference_equals_whole_batch(model_and_params):
    model, params = model_and_params
    batch = next(stream("preference"))
    whole = jax.jit(lambda p, b: pc.reference_logps(model, p, b))(params, batch)
    chunked = jax.jit(lambda p, b: pc.reference_logps(model, p, b, num_chunks=2))(params, batch)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in
                                        [*REPO.glob("configs/dpo_*.yaml"), *REPO.glob("configs/kto_*.yaml")]))
def test_every_yaml_config_parses(path):
    cfg = load_config(dpo.DPOConfig, REPO / path)
    assert cfg.loss.algorithm in pref.ALGORITHMS and cfg.batch_size % cfg.num_micro_batches == 0


@pytest.mark.parametrize("override, key", [
    ("loss.loss_type=nope", "loss.loss_type"), ("loss.algorithm=simpo", "loss.loss_type"),
    ("precompute_ref_logps=true", "precompute_ref_logps"), ("loss.beta=0", "loss.beta"),
    ("loss.f_divergence=kl", "loss.f_divergence")])
def test_bad_config_names_the_key(override, key):
    base = ["model.path=m", "data.path=d"]
    base += ["loss.algorithm=orpo"] if override.startswith("precompute") else ["loss.loss_type=sigmoid"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(dpo.DPOConfig, None, [*base, override])


# ------------------------------------------------------------------------------------ driver (slow)
@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    """A tiny HF Llama with the fixture tokenizer, and the demo task's data (plus KTO rows from the pairs)."""
    from rlhf_jax import fixtures, tasks

    root = tmp_path_factory.mktemp("dpo_driver")
    tok = fixtures.build_tokenizer(root / "tokenizer")
    model_dir = fixtures.build_tiny_model(root / "model", "llama", tokenizer=tok, hidden=32, layers=2, heads=4,
                                          kv_heads=2, max_positions=128)
    data = tasks.write_task_data(root / "data", n_sft=512, n_pref=512, n_eval=64, n_prompts=64, seed=0)
    for split in ("train", "eval"):
        rows = [json.loads(ln) for ln in data[f"pref_{split}"].read_text().splitlines()]
        kto = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows for k in
               ("chosen", "rejected")]
        data[f"kto_{split}"] = tasks.write_jsonl(root / "data" / f"kto_{split}.jsonl", kto)
    return model_dir, data


def driver_config(model_dir, data, out, *overrides, kto=False):
    k = "kto" if kto else "pref"
    return load_config(dpo.DPOConfig, None, [
        f"model.path={model_dir}", f"data.path={data[k + '_train']}", f"data.eval_path={data[k + '_eval']}",
        "data.max_prompt_len=16", "data.max_completion_len=24", "data.max_seq_len=40", "data.buckets=[40]",
        "batch_size=8", "eval_batch_size=32", "run.total_steps=3", "run.log_every=1", "run.tensorboard=false",
        "run.progress=off", f"run.output_dir={out}", "optim.learning_rate=1e-3", *overrides])


def _records(out) -> list[dict]:
    return [json.loads(ln) for ln in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_driver_precomputed_reference_equals_live_and_caches(hf_setup, tmp_path):
    model_dir, data = hf_setup
    live = dpo.train(driver_config(model_dir, data, tmp_path / "live", "export=false"))
    pre = dpo.train(driver_config(model_dir, data, tmp_path / "pre", "export=false", "precompute_ref_logps=true",
                                  f"ref_logps_cache_dir={tmp_path / 'cache'}", "num_micro_batches=2"))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # train and eval sets
    a, b = _records(tmp_path / "live"), _records(tmp_path / "pre")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 4
    for ra, rb in zip(a, b):
        for name in ("loss", "rewards_margin", "rewards_accuracy"):
            assert abs(ra[name] - rb[name]) < 1e-6, (ra, rb)
    assert live["eval/pairs"] == 64 and abs(live["eval/loss"] - pre["eval/loss"]) < 1e-6


@pytest.mark.slow
def test_driver_exact_resume_and_export(hf_setup, tmp_path):
    from rlhf_jax import models

    model_dir, data = hf_setup
    args = ("run.total_steps=4", "run.save_every=2", "loss.loss_type=ipo")
    dpo.train(driver_config(model_dir, data, tmp_path / "straight", *args))
    dpo.train(driver_config(model_dir, data, tmp_path / "resumed", *args), stop_at_step=2)
    assert not (tmp_path / "resumed" / "model").exists()
    dpo.train(driver_config(model_dir, data, tmp_path / "resumed", *args))
    assert [r["loss"] for r in _records(tmp_path / "straight")] == [r["loss"] for r in _records(tmp_path / "resumed")]
    _, p1 = models.load_pretrained(tmp_path / "straight" / "model")
    _, p2 = models.load_pretrained(tmp_path / "resumed" / "model")
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


@pytest.mark.slow
def test_driver_kto_end_to_end(hf_setup, tmp_path):
    model_dir, data = hf_setup
    out = dpo.train(driver_config(model_dir, data, tmp_path / "kto", "loss.algorithm=kto", "export=false",
                                  "precompute_ref_logps=true", kto=True))
    recs = _records(tmp_path / "kto")
    assert all(np.isfinite(r["loss"]) for r in recs) and recs[-1]["split"] == "eval"
    assert out["eval/pairs"] == 128 and out["eval/kl"] >= 0 and "eval/rewards_accuracy" not in out


def sample_gold(model_dir, prompts: list[str], *, seed: int = 0, max_new_tokens: int = 16) -> float:
    """Mean gold score of responses sampled (temperature 1) by the HF model at `model_dir`."""
    from transformers import AutoTokenizer

    from rlhf_jax import models, rollout, tasks

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model, params = models.load_pretrained(model_dir)
    ids, mask = pad_prompts([tok(p, add_special_tokens=False)["input_ids"] for p in prompts],
                                    pad_token_id=tok.pad_token_id or 0, buckets=(16, 32))
    out = rollout.generate(model, params, ids, mask, key=jax.random.key(seed), max_new_tokens=max_new_tokens,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0)
    resp = np.asarray(out.response_ids_BxT)
    texts = [tok.decode(r[: int(n)], skip_special_tokens=True) for r, n in zip(resp, np.asarray(out.lengths_B))]
    return float(np.mean(tasks.gold_score(prompts, texts)))


def learning_run(model_dir, data, out: pathlib.Path, *, sft_steps: int = 200, dpo_steps: int = 60,
                 dpo_lr: float = 2e-4) -> dict:
    """SFT the tiny model on the demo task, then DPO on gold-labelled pairs; held-out numbers before/after."""
    from rlhf_jax.recipes import sft

    sft_cfg = load_config(sft.SFTConfig, None, [
        f"model.path={model_dir}", f"data.path={data['sft_train']}", "data.max_prompt_len=16",
        "data.max_completion_len=24", "data.max_seq_len=40", "data.buckets=[40]", "batch_size=32",
        f"run.total_steps={sft_steps}", "run.log_every=40", "run.tensorboard=false", "run.progress=off",
        f"run.output_dir={out / 'sft'}", "optim.learning_rate=3e-3", "optim.warmup_steps=10",
        "optim.schedule=cosine", "optim.min_lr_ratio=0.1"])
    sft_dir = sft.train(sft_cfg)["export_dir"]
    prompts = [json.loads(ln)["prompt"] for ln in data["prompts_eval"].read_text().splitlines()] * 4
    before = sample_gold(sft_dir, prompts)
    cfg = driver_config(sft_dir, data, out / "dpo", f"run.total_steps={dpo_steps}", "batch_size=32",
                        f"optim.learning_rate={dpo_lr}", "optim.warmup_steps=5", "run.log_every=20")
    res = dpo.train(cfg)
    after = sample_gold(res["export_dir"], prompts)
    return {"gold_before": before, "gold_after": after, "eval_accuracy_after": res["eval/rewards_accuracy"],
            "eval_loss_after": res["eval/loss"], "eval_margin_after": res["eval/rewards_margin"]}


@pytest.mark.slow
def test_dpo_learns_the_demo_task(hf_setup, tmp_path):
    """Held-out implicit-reward accuracy (0 before: policy == reference gives every margin 0, loss log 2)
    and the gold score of sampled responses both rise."""
    model_dir, data = hf_setup
    r = learning_run(model_dir, data, tmp_path)
    print("DPO learning:", json.dumps(r))
    assert r["eval_accuracy_after"] > 0.7 and r["eval_loss_after"] < np.log(2) - 0.03, r
    assert r["gold_after"] > r["gold_before"] + 0.03, r  # measured 0.052 -> 0.100 (256 samples)


def test_shared_prompt_equals_the_stacked_rows(model_and_params):
    """Each pair's prompt encoded once (rows chosen ++ rejected laid out [left-padded prompt | completion],
    `pair_prompt_layout`) gives the stacked rows' per-token log-probs, WPO's log Σp², sums, counts and
    gradients, also through the reference's strided chunks; prompts of different lengths, right padding."""
    model, params = model_and_params
    rows = pref.stacked_rows(next(stream("preference")))
    starts = np.argmax(np.asarray(rows[2]), axis=1)
    assert len(set(starts.tolist())) > 1 and np.array_equal(starts[:B], starts[B:])  # a pair shares its prompt
    P, W = 8, 6  # the stream's data.max_prompt_len; synthetic completions have 2-6 tokens
    ids, mask, targets, scored = rows_lib.pair_prompt_layout(*rows, prompt_width=P, completion_width=W)
    assert ids.shape == (2 * B, P + W)
    np.testing.assert_array_equal(ids[:B, :P], ids[B:, :P])  # the shared columns
    np.testing.assert_array_equal(np.asarray(scored).sum(axis=1), np.asarray(rows[2]).sum(axis=1))
    plain = pref.completion_token_logps(model, params, *rows, completion_width=W, with_lssp=True)
    shared = jax.jit(lambda p: pref.completion_token_logps(model, p, *rows, completion_width=W, with_lssp=True,
                                                           prompt_width=P))(params)
    m = np.asarray(plain[1]) > 0
    np.testing.assert_array_equal(np.asarray(shared[1]), np.asarray(plain[1]))
    for a, b in ((plain[0], shared[0]), (plain[2], shared[2])):
        np.testing.assert_allclose(np.asarray(b)[m], np.asarray(a)[m], rtol=1e-5, atol=1e-5)
    full = pref.completion_logps(model, params, *rows, completion_width=W)
    np.testing.assert_allclose(pref.completion_logps(model, params, *rows, completion_width=W, prompt_width=P)[0],
                               full[0], rtol=1e-5, atol=1e-5)
    g_plain = jax.grad(lambda p: jnp.sum(pref.completion_logps(model, p, *rows, completion_width=W)[0]))(params)
    g_shared = jax.grad(lambda p: jnp.sum(pref.completion_logps(model, p, *rows, completion_width=W,
                                                                prompt_width=P)[0]))(params)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_shared)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    batch = next(stream("preference"))
    ref = pc.reference_logps(model, params, batch, num_chunks=2, completion_width=W, prompt_width=P)
    np.testing.assert_allclose(ref, pc.reference_logps(model, params, batch, completion_width=W), rtol=1e-5, atol=1e-5)


def test_kto_rows_share_their_prompt_with_their_kl_rows(model_and_params):
    """KTO's row b and KL row b (prompt b, another row's completion) encoded on one prompt cache give the stacked
    rows' losses, gradients and reference sums."""
    model, params = model_and_params
    batch = next(stream("unpaired"))
    rows = pref.stacked_rows(batch)
    starts = np.argmax(np.asarray(rows[2]), axis=1)
    assert len(set(starts.tolist())) > 1 and np.array_equal(starts[:B], starts[B:])  # row b, KL row b: one prompt
    P, W = 8, 6
    ref = pc.reference_logps(model, params, batch, completion_width=W)
    for chunks in (1, 2):
        np.testing.assert_allclose(pc.reference_logps(model, params, batch, num_chunks=chunks, completion_width=W,
                                                      prompt_width=P), ref, rtol=1e-5, atol=1e-5)
    batch = pc.with_ref(batch, ref * 0.9)
    for loss in KTO_LOSSES:
        def run(width):
            fn = pref.make_loss_fn(model, loss, completion_width=W, prompt_width=width)
            return jax.value_and_grad(lambda p: fn(p, batch, None)[0][0])(params)

        (plain, g_plain), (shared, g_shared) = run(None), run(P)
        np.testing.assert_allclose(shared, plain, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_shared)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_shared_prompt_width_follows_the_config():
    def cfg(*overrides):
        base = ["model.path=m", "data.path=d", "data.max_prompt_len=64", "data.max_completion_len=64",
                "data.max_seq_len=128"]
        return load_config(dpo.DPOConfig, None, [*base, *overrides])

    assert dpo.shared_prompt_width(cfg()) == 64  # 64 + 2 · 64 = 3/4 of 2 · 128
    assert dpo.shared_prompt_width(cfg("share_prompt=false")) is None
    assert dpo.shared_prompt_width(cfg("loss.algorithm=kto")) == 64  # a row and its KL row share prompt b
    assert dpo.shared_prompt_width(cfg("data.max_prompt_len=72")) is None  # 200 tokens: more than 3/4 of 256
    assert dpo.shared_prompt_width(cfg("data.max_completion_len=200")) is None  # the head scores every position
    assert dpo.shared_prompt_width(cfg("model.scan_layers=true")) == 64
    assert dpo.shared_prompt_width(cfg("model.scan_layers=true", "model.remat=full")) is None  # L² cache copies
    assert dpo.shared_prompt_width(cfg("model.remat=full")) == 64
