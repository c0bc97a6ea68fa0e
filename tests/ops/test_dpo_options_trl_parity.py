"""TRL 1.16's DPO options (several loss types + ``loss_weights``, ``sft``/``rpo_alpha``, ``use_weighting``,
``ld_alpha``) against its own ``DPOTrainer._compute_loss``, on the same random per-token log-probs.

As ``test_dpo_trl_parity.py``: TRL's loss code runs unmodified on a trainer stand-in whose model returns
per-token log-probs (and WPO's ``log_sum_sq_probs``) we choose; the reference is a second stand-in model,
so TRL applies ``ld_alpha`` to it too. Everything is float64 on both sides.
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

B, T = 5, 9


def _case(seed):
    """Per-token policy/reference log-probs [2B, T] (rows chosen ++ rejected), completion masks, lssp."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T, size=2 * B)
    prompt = rng.integers(0, 2, size=2 * B)  # completion starts after 0 or 1 prompt token
    mask = np.zeros((2 * B, T), np.int64)
    for i, (p, n) in enumerate(zip(prompt, lengths)):
        mask[i, p: min(p + n, T)] = 1
    logp = -rng.uniform(0.05, 3.0, size=(2 * B, T))
    ref = logp + rng.normal(0.0, 0.4, size=(2 * B, T))
    lssp = -rng.uniform(0.1, 2.0, size=(2 * B, T))
    return logp * mask, ref * mask, mask, lssp


def _trl(logp, ref, mask, lssp, *, loss_types, loss_weights, use_weighting, ld_alpha, beta=0.2):
    n2, t = mask.shape
    completion_mask = torch.zeros(n2, t + 1, dtype=torch.long)
    completion_mask[:, 1:] = torch.tensor(mask)

    def outputs(values):
        return types.SimpleNamespace(
            log_probs=torch.tensor(values, dtype=torch.float64),
            log_sum_sq_probs=torch.tensor(lssp, dtype=torch.float64),
            entropy=torch.zeros(n2, t, dtype=torch.float64),
            mean_logits=torch.zeros(n2, t, dtype=torch.float64),
            is_top1=torch.zeros(n2, t, dtype=torch.bool),
        )

    identity = lambda x: x  # noqa: E731
    policy = torch.nn.Module()  # a real (empty) module: accelerate's PEFT/compile checks inspect it
    policy.is_gradient_checkpointing = False
    fake = types.SimpleNamespace(
        model=policy,
        ref_model=lambda **kw: outputs(ref),
        args=types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=False, f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5, loss_types=list(loss_types), loss_weights=list(loss_weights), beta=beta,
        label_smoothing=0.0, use_weighting=use_weighting, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.ones(n2, t + 1, dtype=torch.long),
              "attention_mask": torch.ones(n2, t + 1, dtype=torch.long), "completion_mask": completion_mask}
    loss = trl_dpo.DPOTrainer._compute_loss(fake, lambda **kw: outputs(logp), inputs, return_outputs=False)
    m = fake._metrics["train"]
    return float(loss), m["rewards/chosen"][0], m["rewards/rejected"][0]


def _ours(logp, ref, mask, lssp, *, loss_types, loss_weights, use_weighting, ld_alpha, beta=0.2):
    with jax.enable_x64(True):
        lp, rf, m, sq = (jnp.asarray(a, jnp.float64) for a in (logp, ref, mask, lssp))
        n = jnp.sum(m, axis=1)
        if ld_alpha is None:
            seq, ref_seq = ops.sequence_logprobs(lp, m), ops.sequence_logprobs(rf, m)
        else:
            seq, ref_seq = ops.ld_logps(lp, m, ld_alpha=ld_alpha), ops.ld_logps(rf, m, ld_alpha=ld_alpha)
        weights = None
        if use_weighting:
            aligned = ops.sequence_logprobs(lp - sq, m)
            weights = ops.wpo_weights(aligned[:B], aligned[B:], n[:B], n[B:])
        sft = ops.sft_nll(lp[:B], m[:B])
        losses, cr, rj = ops.dpo_loss(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], beta=beta,
                                      loss_type=tuple(loss_types), loss_weights=tuple(loss_weights),
                                      chosen_lengths_B=n[:B], rejected_lengths_B=n[B:], sft_nll=sft,
                                      weights_B=weights)
        return float(losses.mean()), float(cr.mean()), float(rj.mean())


MPO = (("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0))  # TRL docs: MPO = sigmoid + bco_pair + sft
CASES = {
    "mpo": dict(loss_types=MPO[0], loss_weights=MPO[1], use_weighting=False, ld_alpha=None),
    "rpo_alpha": dict(loss_types=("sigmoid", "sft"), loss_weights=(1.0, 0.5), use_weighting=False, ld_alpha=None),
    "ipo_hinge_sft": dict(loss_types=("ipo", "hinge", "sft"), loss_weights=(1.0, 0.3, 2.0), use_weighting=False,
                          ld_alpha=None),
    "wpo": dict(loss_types=("sigmoid",), loss_weights=(1.0,), use_weighting=True, ld_alpha=None),
    # sft + use_weighting cannot be compared: TRL 1.16 raises there (in-place multiply of the expanded sft
    # scalar, dpo_trainer.py:1526); ours weights the sft term like every other term, as TRL's code intends.
    "wpo_pair": dict(loss_types=("sigmoid", "bco_pair"), loss_weights=(0.8, 0.2), use_weighting=True, ld_alpha=None),
    "ld_0.5": dict(loss_types=("sigmoid",), loss_weights=(1.0,), use_weighting=False, ld_alpha=0.5),
    "ld_0": dict(loss_types=("sigmoid", "sft"), loss_weights=(1.0, 0.1), use_weighting=False, ld_alpha=0.0),
    "ld_wpo_norm": dict(loss_types=("sigmoid_norm", "apo_zero"), loss_weights=(0.5, 0.5), use_weighting=True,
                        ld_alpha=0.3),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_options_match_trl_1_16(name, seed):
    assert __import__("trl").__version__.startswith("1.16")
    case = _case(seed)
    want = _trl(*case, **CASES[name])
    got = _ours(*case, **CASES[name])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_ld_alpha_one_is_the_plain_sum():
    logp, _, mask, _ = _case(3)
    got = ops.ld_logps(jnp.asarray(logp, jnp.float32), jnp.asarray(mask), ld_alpha=1.0)
    np.testing.assert_allclose(got, (logp * mask).sum(1), rtol=1e-6)
