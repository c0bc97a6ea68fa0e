"""`ops.dpo_loss` against TRL 1.16's own `DPOTrainer._compute_loss`, run on the same random log-probs.

TRL is a test-only reference (like torch). Its loss code runs unmodified: we call the unbound method with a
minimal trainer stand-in and a stand-in model whose per-token log-probs sum to chosen log-probs we choose,
with precomputed reference log-probs. Everything is float64 on both sides (`jax.enable_x64`).
"""

from __future__ import annotations

import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

from rlhf_jax import ops  # noqa: E402

B = 6
F_DIV_OK = set(ops.F_DIVERGENCE_LOSS_TYPES)


def _random_case(seed):
    rng = np.random.default_rng(seed)
    lengths_c = rng.integers(1, 9, size=B)
    lengths_r = rng.integers(1, 9, size=B)
    pc = -rng.uniform(2.0, 20.0, size=B)
    pr = -rng.uniform(2.0, 20.0, size=B)
    rc = pc + rng.normal(0.0, 1.5, size=B)
    rr = pr + rng.normal(0.0, 1.5, size=B)
    return pc, pr, rc, rr, lengths_c, lengths_r


def _trl_loss(pc, pr, rc, rr, lc, lr, *, loss_type, beta, label_smoothing, f_divergence, alpha):
    """Mean loss and rewards from TRL's `_compute_loss` on the given sequence log-probs.

    TRL's alpha-divergence clamps through a dtype table without float64, so that case runs in float32.
    """
    n = len(pc)
    tdtype = torch.float32 if f_divergence == "alpha_divergence" else torch.float64
    lengths = np.concatenate([lc, lr])
    logps = np.concatenate([pc, pr])
    seq = int(lengths.max()) + 1
    completion_mask = torch.zeros(2 * n, seq, dtype=torch.long)
    per_token = torch.zeros(2 * n, seq - 1, dtype=tdtype)
    for i, (length, total) in enumerate(zip(lengths, logps)):
        completion_mask[i, 1 : length + 1] = 1
        per_token[i, :length] = total / length
    outputs = types.SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(2 * n, seq - 1, dtype=tdtype),
        mean_logits=torch.zeros(2 * n, seq - 1, dtype=tdtype),
        is_top1=torch.zeros(2 * n, seq - 1, dtype=torch.bool),
    )
    identity = lambda x: x  # noqa: E731
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type=f_divergence,
        f_alpha_divergence_coef=alpha,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=0.05),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * n, seq, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, seq, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(rc, dtype=tdtype),
        "ref_rejected_logps": torch.tensor(rr, dtype=tdtype),
    }
    loss = trl_dpo.DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)
    metrics = fake._metrics["train"]
    return float(loss), metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]


def _ours(pc, pr, rc, rr, lc, lr, **kw):
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
        losses, cr, rj = ops.dpo_loss(f64(pc), f64(pr), f64(rc), f64(rr), chosen_lengths_B=f64(lc),
                                      rejected_lengths_B=f64(lr), **kw)
        return float(losses.mean()), float(cr.mean()), float(rj.mean()), np.asarray(losses)


CASES = [(lt, "reverse_kl") for lt in ops.DPO_LOSS_TYPES] + [
    (lt, fd) for lt in sorted(F_DIV_OK) for fd in ("forward_kl", "js_divergence", "alpha_divergence")
]


@pytest.mark.parametrize("loss_type,f_divergence", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_loss_matches_trl_1_16(loss_type, f_divergence, seed):
    assert trl_dpo.__name__ and __import__("trl").__version__.startswith("1.16")
    pc, pr, rc, rr, lc, lr = _random_case(seed)
    kw = dict(loss_type=loss_type, beta=0.3, f_divergence=f_divergence, alpha=0.7,
              label_smoothing=0.1 if loss_type in {"exo_pair", "robust", "aot", "aot_unpaired"} else 0.0)
    want_loss, want_c, want_r = _trl_loss(pc, pr, rc, rr, lc, lr, **kw)
    got_loss, got_c, got_r, losses = _ours(pc, pr, rc, rr, lc, lr, **kw)
    rtol = 2e-5 if f_divergence == "alpha_divergence" else 1e-6  # TRL side in float32 there
    np.testing.assert_allclose(got_loss, want_loss, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose([got_c, got_r], [want_c, want_r], rtol=rtol, atol=1e-12)
    if loss_type not in {"aot", "aot_unpaired"}:  # per-pair losses: TRL on one pair at a time
        for i in range(B):
            one = tuple(a[i : i + 1] for a in (pc, pr, rc, rr, lc, lr))
            np.testing.assert_allclose(losses[i], _trl_loss(*one, **kw)[0], rtol=rtol, atol=1e-12)
