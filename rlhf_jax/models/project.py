"""``project``: the projection ``x @ W`` of every decoder layer, as one 2-D GEMM with a hand-written VJP.

The model (`rlhf_jax.models.transformer`) calls it for every weight product; it is a kernel-level choice
(GEMM shapes, what the backward keeps as residuals), not part of the architecture.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def project(x, w, n_in: int = 1, dtype=None):
    """``y[..., o] = Σ_i x[..., i] · w[i, o]``: the last ``n_in`` axes of ``x`` contract with the first
    ``n_in`` axes of ``w`` (a projection ``x @ W`` with multi-axis ``i``/``o``, e.g. heads × head_dim).

    The same product as ``jnp.einsum``, computed as ONE 2-D GEMM ``[N, I] @ [I, O]`` (N = all leading
    axes); its custom VJP keeps the backward as 2-D GEMMs too: ``dx = g Wᵀ`` and ``dW = (gᵀ x)ᵀ``
    contracted over the N tokens. Autodiff of the einsum contracts ``dW`` over (batch, length) as two
    axes, and XLA:CPU lays that product out by transposing ``[tokens, F]`` activations inside the loop
    fusion that produces them (a strided walk, ~130 ms per layer at ~100M and 4096 tokens): the SwiGLU
    block's forward + backward went from 555 to 350 ms in isolation (``benchmarks`` README, PPO row).

    ``dtype`` casts ``w`` to the compute dtype INSIDE the product, so the backward keeps ``w`` in its stored
    dtype as its residual: ``project(x, w.astype(f32))`` of a bf16 base (LoRA's `model.base_dtype`) made the
    f32 copy of every layer's weight a residual held from the forward to the backward (an l2048 LoRA step
    with `scan_layers`, 4 layers: 1.79 → 1.10 GiB of temporaries; f32 base: 0.39). Same numbers either way.
    Unrolled layers do not gain (0.95 GiB): XLA:CPU merges the backward's convert with the forward's.
    """
    return _project(x, w, n_in, dtype)


def _flat(x, w, n_in):
    i = math.prod(w.shape[:n_in])
    return x.reshape(-1, i), w.reshape(i, -1)


def _cast(w, dtype):
    return w if dtype is None else w.astype(dtype)


def _project(x, w, n_in, dtype):
    x2, w2 = _flat(x, _cast(w, dtype), n_in)
    return (x2 @ w2).reshape(*x.shape[: x.ndim - n_in], *w.shape[n_in:])


def _project_fwd(x, w, n_in, dtype):
    return _project(x, w, n_in, dtype), (x, w)


def _project_bwd(n_in, dtype, res, g):
    x, w = res
    x2, w2 = _flat(x, _cast(w, dtype), n_in)
    g2 = g.reshape(x2.shape[0], w2.shape[1])
    dx = (g2 @ w2.T).reshape(x.shape)
    dw = lax.dot_general(g2, x2, (((0,), (0,)), ((), ()))).T.reshape(w.shape)
    return dx, dw.astype(w.dtype)


project.defvjp(_project_fwd, _project_bwd)


def project_out_in(x, w, n_in: int = 1, dtype=None):
    """``project`` for a weight stored ``[out…, in…]`` (``config.weight_layout == "out_in"``, PyTorch's
    ``nn.Linear`` layout): ``y[..., o] = Σ_i x[..., i] · w[o, i]``, one 2-D GEMM ``[N, I] · [O, I]ᵀ``.

    The same sums as ``project(x, wᵀ)`` (the order of a float32 sum may differ in the last bits). Used by
    decode copies of the weights (`rlhf_jax.models.weight_layout`), so it has no hand-written VJP.
    """
    n_out = w.ndim - n_in
    i = math.prod(w.shape[n_out:])
    x2, w2 = x.reshape(-1, i), _cast(w, dtype).reshape(-1, i)
    y2 = lax.dot_general(x2, w2, (((1,), (1,)), ((), ())))
    return y2.reshape(*x.shape[: x.ndim - n_in], *w.shape[:n_out])
