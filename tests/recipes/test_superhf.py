"""SuperHF in rlhf_jax.recipes.raft / rlhf_jax.algos.superhf: preset and config keys, the loss against the
plain SFT loss and a hand re-derivation, the reference scorer, and the metrics."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops
from rlhf_jax.algos import superhf
from rlhf_jax.algos.supervised import sft_loss
from rlhf_jax.config import ConfigError, load_config
from rlhf_jax.online import batches as gr
from rlhf_jax.recipes import raft

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # importlib mode: make the sibling modules importable
from test_dpo import model_and_params  # noqa: E402, F401 (fixture)
from test_raft import rollout  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_preset_and_config_keys():
    base = ("model.path=x", "data.path=y")
    assert load_config(raft.RAFTConfig, None, base).kl_coef == 0.0  # plain RAFT: no KL prior
    cfg = load_config(raft.RAFTConfig, REPO / "configs" / "superhf_tiny_cpu.yaml", base)
    assert cfg.algo.preset == "superhf" and cfg.raft.kl_coef is None and cfg.kl_coef == 0.35
    assert load_config(raft.RAFTConfig, None, (*base, "algo.preset=superhf", "raft.kl_coef=1.5")).kl_coef == 1.5
    with pytest.raises(ConfigError, match="raft.kl_coef"):
        load_config(raft.RAFTConfig, None, (*base, "raft.kl_coef=-1"))
    with pytest.raises(ConfigError, match="algo.preset"):
        load_config(raft.RAFTConfig, None, (*base, "algo.preset=ppo"))


def _batch(model, params, ref_params):
    sft = jax.tree.map(jnp.asarray, gr.rollout_sft_batch(rollout()))
    logits = model.apply({"params": ref_params}, sft.input_ids_BxS, sft.attention_mask_BxS,
                         positions_BxS=sft.positions_BxS, segment_ids_BxS=sft.segment_ids_BxS)
    ref = ops.token_logprobs(logits[:, :-1], sft.input_ids_BxS[:, 1:]) * sft.loss_mask_BxS[:, 1:]
    return superhf.SuperHFBatch(sft, ref)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_loss_is_sft_plus_kl_term(model_and_params, mode):
    model, params = model_and_params
    ref_params = jax.tree.map(lambda x: x * 0.8, params)
    batch = _batch(model, params, ref_params)
    (s0, n0), _ = sft_loss(model, params, batch.sft, None, mode=mode)
    (s, n), aux = superhf.superhf_loss(model, params, batch, None, kl_coef=0.0, mode=mode)
    np.testing.assert_allclose([s, n], [s0, n0], rtol=1e-6)  # kl_coef 0 is RAFT's SFT loss
    (s2, n2), aux2 = superhf.superhf_loss(model, params, batch, None, kl_coef=2.0, mode=mode)
    # hand re-derivation: -logp + 2 * k3 per kept token, aggregated by `mode`
    logits = model.apply({"params": params}, batch.sft.input_ids_BxS, batch.sft.attention_mask_BxS,
                         positions_BxS=batch.sft.positions_BxS, segment_ids_BxS=batch.sft.segment_ids_BxS)
    lp = np.asarray(ops.token_logprobs(logits[:, :-1], batch.sft.input_ids_BxS[:, 1:]))
    m = np.asarray(batch.sft.loss_mask_BxS[:, 1:]) > 0
    r = np.asarray(batch.ref_logp_BxT) - lp
    tok = np.where(m, -lp + 2.0 * (np.exp(r) - 1 - r), 0.0)
    want = tok.sum() / m.sum() if mode == "token-mean" else np.mean(tok.sum(1) / m.sum(1))
    np.testing.assert_allclose(float(s2) / float(n2), want, rtol=1e-5)
    met = superhf.superhf_metrics(jax.device_get(aux2), 2.0)
    k3 = np.where(m, np.expm1(r.astype(np.float64)) - r, 0.0).sum() / m.sum()
    np.testing.assert_allclose([met["kl"], met["kl_term"], met["nll"]], [k3, 2 * k3, -(lp * m).sum() / m.sum()],
                               rtol=1e-4, atol=1e-7)  # k3 of a small log-ratio: float32 rounding
    assert met["kl"] > 0 and float(aux.sequences) == 2


def test_kl_is_zero_at_the_reference(model_and_params):
    model, params = model_and_params
    batch = _batch(model, params, params)
    (_, _), aux = superhf.superhf_loss(model, params, batch, None, kl_coef=5.0)
    assert abs(float(aux.kl)) < 1e-5
