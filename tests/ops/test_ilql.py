"""ILQL losses (rlhf_jax.ops.ilql): golden values, a Python-loop oracle, parity with a transcription of trlx's
``ILQLConfig.loss`` / ``generate`` in torch, jit, masks, Polyak averaging."""

from __future__ import annotations

from functools import reduce
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rlhf_jax import ops
from rlhf_jax.ops import ilql as I

HP = dict(tau=0.7, gamma=0.99, cql_scale=0.1, awac_scale=1.0, beta=0.5)


def _inputs(seed=0, B=3, T=5, V=7, lengths=(5, 3, 1), n_q=2):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return dict(logits=f(B, T, V), qs=[f(B, T, V) for _ in range(n_q)], tqs=[f(B, T, V) for _ in range(n_q)],
                v=f(B, T + 1), actions=rng.integers(0, V, (B, T)).astype(np.int32),
                rewards=(f(B, T) * mask).astype(np.float32), mask=mask)


def _ours(x, **hp):
    return ops.ilql_loss(x["logits"], x["qs"], x["tqs"], x["v"], x["actions"], x["rewards"], x["mask"], **{**HP, **hp})


# ------------------------------------------------------------------------------------- trlx transcription
def _trlx_loss(x, *, tau, gamma, cql_scale, awac_scale, beta):
    """trlx/models/modeling_ilql.py ILQLConfig.loss, verbatim but for the batch construction (make_experience
    + ilql_collate_fn: actions_ixs = arange(n), dones = [1]*n + [0], zero-padded)."""
    B, T = x["actions"].shape
    lengths = x["mask"].sum(1)
    dones = np.zeros((B, T + 1), np.int64)
    for b, n in enumerate(lengths):
        dones[b, :n] = 1
    input_ids = np.concatenate([np.zeros((B, 1), np.int64), x["actions"]], 1)
    labels = SimpleNamespace(input_ids=torch.tensor(input_ids), actions_ixs=torch.arange(T).repeat(B, 1),
                             dones=torch.tensor(dones), rewards=torch.tensor(x["rewards"]))
    logits = torch.tensor(np.concatenate([x["logits"], np.zeros_like(x["logits"][:, :1])], 1))
    qs = [torch.tensor(q) for q in x["qs"]]
    target_qs = [torch.tensor(q) for q in x["tqs"]]
    vs = torch.tensor(x["v"])[..., None]

    terminal_mask = labels.dones[:, :-1]
    n_nonterminal = max(1, terminal_mask.sum())
    actions = labels.input_ids[:, 1:].gather(dim=1, index=labels.actions_ixs).unsqueeze(-1)
    nactions = actions.shape[1]
    bsize, _, dsize = logits.shape
    Q = [q.gather(-1, actions).squeeze(-1) for q in qs]
    targetQs = [q.gather(-1, actions).squeeze(-1).detach() for q in target_qs]
    targetQ = reduce(torch.minimum, targetQs)
    V = vs[:, :-1, 0]
    Vnext = vs[:, 1:, 0] * labels.dones[:, 1:].to(vs.dtype)
    Q_ = labels.rewards + gamma * Vnext.detach()
    loss_qs = [((Qi - Q_) * terminal_mask).pow(2).sum() / n_nonterminal for Qi in Q]
    loss_q = sum(loss_qs)
    targetQ = targetQ.detach()
    loss_v = (((targetQ >= V).int() * tau * (targetQ - V).pow(2)
               + (targetQ < V).int() * (1 - tau) * (targetQ - V).pow(2)) * terminal_mask).sum() / n_nonterminal

    def cql_loss(q):
        loss = F.cross_entropy(q.reshape(-1, dsize), actions.reshape(-1), reduction="none")
        loss = loss.reshape(bsize, nactions) * terminal_mask
        return loss.sum() / n_nonterminal

    loss_cql = sum(cql_loss(q) for q in qs)
    idx = labels.actions_ixs.unsqueeze(-1).expand(B, T, dsize)
    action_logits = logits.gather(dim=1, index=idx)
    cross_entropy = F.cross_entropy(action_logits.reshape(-1, dsize), actions.reshape(-1),
                                    reduction="none").reshape(bsize, nactions)
    awac_weight = torch.exp(beta * (targetQ - V))
    loss_awac = torch.sum(cross_entropy * awac_weight * terminal_mask) / n_nonterminal
    loss = loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac
    return {k: float(v) for k, v in dict(loss=loss, loss_q=loss_q, loss_v=loss_v, loss_cql=loss_cql,
                                          loss_awac=loss_awac).items()}


@pytest.mark.parametrize("seed,n_q,hp", [(0, 2, {}), (1, 1, {}), (2, 2, dict(beta=0.0, tau=0.5, gamma=1.0)),
                                         (3, 2, dict(cql_scale=0.0, awac_scale=2.0, beta=1.0))])
def test_matches_trlx_loss(seed, n_q, hp):
    x = _inputs(seed, n_q=n_q)
    full = {**HP, **hp}
    want = _trlx_loss(x, **full)
    terms = _ours(x, **hp)
    n = x["mask"].sum()
    for name in want:
        got = float(jnp.sum(getattr(terms, name))) / n
        assert got == pytest.approx(want[name], rel=1e-5, abs=1e-6), name


def test_matches_trlx_gradients():
    """Gradients of the token-mean loss w.r.t. logits, Q and V equal trlx's autograd ones."""
    x = _inputs(4)

    def ours(logits, q0, q1, v):
        t = ops.ilql_loss(logits, [q0, q1], x["tqs"], v, x["actions"], x["rewards"], x["mask"], **HP)
        return jnp.sum(t.loss) / x["mask"].sum()

    g = jax.grad(ours, argnums=(0, 1, 2, 3))(x["logits"], *x["qs"], x["v"])
    tx = {k: (torch.tensor(v, requires_grad=True) if k in ("logits", "v") else v) for k, v in x.items()}
    tq = [torch.tensor(q, requires_grad=True) for q in x["qs"]]
    # rerun the transcription on leaf tensors
    B, T, V = x["logits"].shape
    logits_ext = torch.cat([tx["logits"], torch.zeros(B, 1, V)], 1)
    loss = _trlx_loss_tensors(logits_ext, tq, x, tx["v"])
    loss.backward()
    np.testing.assert_allclose(np.asarray(g[0]), tx["logits"].grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g[1]), tq[0].grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g[2]), tq[1].grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g[3]), tx["v"].grad.numpy(), rtol=1e-5, atol=1e-6)


def _trlx_loss_tensors(logits, qs, x, v):
    """The same transcription on given (grad-tracking) tensors; returns the loss tensor."""
    B, T = x["actions"].shape
    dones = torch.zeros(B, T + 1)
    for b, n in enumerate(x["mask"].sum(1)):
        dones[b, :n] = 1
    actions = torch.tensor(x["actions"], dtype=torch.int64).unsqueeze(-1)
    terminal_mask = dones[:, :-1]
    n_nonterminal = max(1, terminal_mask.sum())
    Q = [q.gather(-1, actions).squeeze(-1) for q in qs]
    targetQ = reduce(torch.minimum, [torch.tensor(q).gather(-1, actions).squeeze(-1) for q in x["tqs"]])
    V = v[:, :-1]
    Vnext = v[:, 1:] * dones[:, 1:]
    Q_ = torch.tensor(x["rewards"]) + HP["gamma"] * Vnext.detach()
    loss_q = sum(((Qi - Q_) * terminal_mask).pow(2).sum() / n_nonterminal for Qi in Q)
    tau = HP["tau"]
    loss_v = (((targetQ >= V).int() * tau * (targetQ - V).pow(2)
               + (targetQ < V).int() * (1 - tau) * (targetQ - V).pow(2)) * terminal_mask).sum() / n_nonterminal
    dsize = logits.shape[-1]
    cql = sum((F.cross_entropy(q.reshape(-1, dsize), actions.reshape(-1), reduction="none").reshape(B, T)
               * terminal_mask).sum() / n_nonterminal for q in qs)
    ce = F.cross_entropy(logits[:, :T].reshape(-1, dsize), actions.reshape(-1), reduction="none").reshape(B, T)
    with torch.no_grad():
        w = torch.exp(HP["beta"] * (targetQ - V))
    awac = torch.sum(ce * w * terminal_mask) / n_nonterminal
    return loss_q + loss_v + HP["cql_scale"] * cql + HP["awac_scale"] * awac


# -------------------------------------------------------------------------------------------- golden values
def test_golden_one_token():
    """B = 1, T = 1, V = 2 by hand: action 0, reward 1, terminal after it (V(s_1) not bootstrapped)."""
    logits = np.array([[[0.0, 0.0]]], np.float32)  # CE = log 2
    q = np.array([[[1.0, 0.0]]], np.float32)  # Q(a) = 1; CQL = log(e + 1) - 1
    tq = np.array([[[0.5, 3.0]]], np.float32)  # Q̂(a) = 0.5
    v = np.array([[0.25, 100.0]], np.float32)  # V(s_0) = 0.25; V(s_1) ignored (terminal)
    t = ops.ilql_loss(logits, [q], [tq], v, np.array([[0]]), np.array([[1.0]], np.float32), np.array([[1]]),
                      tau=0.7, gamma=0.9, cql_scale=0.1, awac_scale=1.0, beta=2.0)
    assert float(t.loss_q[0, 0]) == pytest.approx(0.0)  # Q = 1 = r
    assert float(t.loss_v[0, 0]) == pytest.approx(0.7 * 0.25 ** 2)
    assert float(t.loss_cql[0, 0]) == pytest.approx(np.log(np.e + 1) - 1, rel=1e-6)
    assert float(t.awac_weight[0, 0]) == pytest.approx(np.exp(2.0 * 0.25), rel=1e-6)
    assert float(t.loss_awac[0, 0]) == pytest.approx(np.exp(0.5) * np.log(2), rel=1e-6)
    want = 0.7 * 0.0625 + 0.1 * (np.log(np.e + 1) - 1) + np.exp(0.5) * np.log(2)
    assert float(t.loss[0, 0]) == pytest.approx(want, rel=1e-6)


def test_golden_bootstrap_and_expectile_below():
    """T = 2: token 0's target bootstraps γ·V(s_1); Q̂ < V uses weight 1 − τ."""
    z = np.zeros((1, 2, 2), np.float32)
    q = np.array([[[2.0, 0.0], [0.0, 0.0]]], np.float32)
    tq = np.array([[[0.0, 0.0], [0.0, 0.0]]], np.float32)
    v = np.array([[1.0, 3.0, 50.0]], np.float32)
    t = ops.ilql_loss(z, [q], [tq], v, np.array([[0, 1]]), np.array([[0.0, 1.0]], np.float32), np.array([[1, 1]]),
                      tau=0.8, gamma=0.5, cql_scale=0.0, awac_scale=0.0, beta=0.0)
    np.testing.assert_allclose(np.asarray(t.loss_q[0]), [(2.0 - 1.5) ** 2, (0.0 - 1.0) ** 2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(t.loss_v[0]), [0.2 * 1.0, 0.2 * 9.0], rtol=1e-6)


def test_expectile_and_polyak():
    np.testing.assert_allclose(np.asarray(I.expectile_loss(jnp.array([2.0, -2.0, 0.0]), tau=0.9)),
                               [3.6, 0.4, 0.0], rtol=1e-6)
    t = {"w": jnp.array([0.0, 10.0])}
    o = {"w": jnp.array([1.0, 0.0])}
    np.testing.assert_allclose(np.asarray(ops.polyak_update(t, o, alpha=0.25)["w"]), [0.25, 7.5])
    np.testing.assert_allclose(np.asarray(ops.polyak_update(t, o, alpha=1.0)["w"]), [1.0, 0.0])


# -------------------------------------------------------------------------------------- Python-loop oracle
def _loop_oracle(x, *, tau, gamma, cql_scale, awac_scale, beta):
    """Per-row, per-token loops in float64."""
    B, T = x["actions"].shape
    out = np.zeros((B, T))
    for b in range(B):
        n = int(x["mask"][b].sum())
        for t in range(n):
            a = x["actions"][b, t]
            v = float(x["v"][b, t])
            v_next = float(x["v"][b, t + 1]) if t + 1 < n else 0.0
            y = float(x["rewards"][b, t]) + gamma * v_next
            tq = min(float(q[b, t, a]) for q in x["tqs"])
            lq = sum((float(q[b, t, a]) - y) ** 2 for q in x["qs"])
            d = tq - v
            lv = (tau if d >= 0 else 1 - tau) * d * d
            lse = lambda row: float(np.log(np.sum(np.exp(row.astype(np.float64)))))  # noqa: E731
            cql = sum(lse(q[b, t]) - float(q[b, t, a]) for q in x["qs"])
            ce = lse(x["logits"][b, t]) - float(x["logits"][b, t, a])
            out[b, t] = lq + lv + cql_scale * cql + awac_scale * np.exp(beta * d) * ce
    return out


@pytest.mark.parametrize("seed", [0, 5])
def test_loop_oracle(seed):
    x = _inputs(seed, B=4, T=6, V=5, lengths=(6, 0, 2, 4))
    np.testing.assert_allclose(np.asarray(_ours(x).loss), _loop_oracle(x, **HP), rtol=2e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- jit, masks, shapes
def test_jit_matches_eager_and_shapes():
    x = _inputs(6)
    eager = _ours(x)
    jitted = jax.jit(lambda *a: ops.ilql_loss(*a, **HP))(x["logits"], x["qs"], x["tqs"], x["v"], x["actions"],
                                                          x["rewards"], x["mask"])
    for a, b in zip(eager, jitted):
        chex.assert_shape(a, (3, 5))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_padding_never_changes_real_tokens():
    """Garbage (even NaN) after each row's last token leaves the real tokens' terms and the sums unchanged."""
    x = _inputs(7)
    base = _ours(x)
    y = {k: (v.copy() if isinstance(v, np.ndarray) else [q.copy() for q in v]) for k, v in x.items()}
    pad = x["mask"] == 0
    y["logits"][pad] = np.nan
    for q in y["qs"] + y["tqs"]:
        q[pad] = 1e3
    y["rewards"][pad] = 7.0
    y["actions"][pad] = 0
    v_pad = np.concatenate([np.zeros((3, 1), bool), pad], 1)  # states after the terminal one
    v_pad[np.arange(3), x["mask"].sum(1)] = False  # the terminal state itself is read (value unused)
    y["v"][v_pad] = -50.0
    got = _ours(y)
    for a, b in zip(base, got):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # the terminal state's value is never bootstrapped
    y["v"][np.arange(3), x["mask"].sum(1)] = 123.0
    np.testing.assert_allclose(np.asarray(_ours(y).loss), np.asarray(base.loss), rtol=1e-6, atol=1e-6)


def test_shape_errors():
    x = _inputs(8)
    with pytest.raises(ValueError, match="T \\+ 1"):
        ops.ilql_loss(x["logits"], x["qs"], x["tqs"], x["v"][:, :-1], x["actions"], x["rewards"], x["mask"], **HP)
    with pytest.raises(ValueError, match="target Q"):
        ops.ilql_loss(x["logits"], x["qs"], x["tqs"][:1], x["v"], x["actions"], x["rewards"], x["mask"], **HP)


# ----------------------------------------------------------------------------------------------- decoding
def test_perturbed_logits_match_trlx_generate_step():
    """trlx generate: pi_beta = log_softmax(logits) + beta * (min(target_qs) - vs); top-k then softmax(·/τ)."""
    rng = np.random.default_rng(9)
    z, q0, q1 = (rng.normal(size=(4, 11)).astype(np.float32) for _ in range(3))
    v = rng.normal(size=(4,)).astype(np.float32)
    got = np.asarray(ops.ilql_perturbed_logits(z, [q0, q1], v, beta=1.5))
    qs = torch.minimum(torch.tensor(q0), torch.tensor(q1))
    want = F.log_softmax(torch.tensor(z), -1) + 1.5 * (qs - torch.tensor(v)[:, None])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    # top-k as trlx's topk_mask, then softmax(·/τ): the sampler's apply_top_k + softmax(z / τ) is the same law
    from rlhf_jax.rollout import apply_top_k
    k, tau = 3, 0.7
    mintop = torch.topk(want, k)[0][:, -1].unsqueeze(-1)
    trlx_pi = F.softmax(torch.where(want < mintop, -np.inf * torch.ones_like(want), want) / tau, -1).numpy()
    ours_pi = np.asarray(jax.nn.softmax(apply_top_k(jnp.asarray(got) / tau, top_k=k), axis=-1))
    np.testing.assert_allclose(ours_pi, trlx_pi, rtol=1e-5, atol=1e-6)
