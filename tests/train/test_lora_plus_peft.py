"""LoRA+ parity: our `optim.lora_plus_ratio` against PEFT's `create_loraplus_optimizer` (torch AdamW) on one
adapted linear layer and a trainable head, two steps with fixed gradients (moments, bias correction, decay)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.run_config import OptimConfig
from rlhf_jax.train.optim import make_optimizer

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 5, bias=False)
        self.score = torch.nn.Linear(5, 1, bias=False)

    def forward(self, x):
        return self.score(self.lin(x))


@pytest.mark.parametrize("ratio, decay", [(16.0, 0.1), (4.0, 0.0)])
def test_lora_plus_matches_peft(ratio, decay):
    torch.manual_seed(0)
    net = peft.get_peft_model(_Net(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["lin"],
                                                      modules_to_save=["score"], init_lora_weights=True))
    lin = net.base_model.model.lin
    a_t, b_t = lin.lora_A["default"].weight, lin.lora_B["default"].weight  # [r, in], [out, r]
    with torch.no_grad():
        b_t.copy_(torch.randn_like(b_t) * 0.1)  # B = 0 at init; a nonzero B makes its decay visible
    head_t = net.base_model.model.score.modules_to_save["default"].weight  # [1, 5]
    opt = create_loraplus_optimizer(net, torch.optim.AdamW, lr=0.01, loraplus_lr_ratio=ratio,
                                    loraplus_weight_decay=decay, eps=1e-8, betas=(0.9, 0.999))
    # ours: A = lora_A.weightᵀ [in, r], B = lora_B.weightᵀ [r, out], the head as `score` [5, 1]
    params = {"lin_lora_a": jnp.asarray(a_t.detach().numpy().T), "lin_lora_b": jnp.asarray(b_t.detach().numpy().T),
              "score": jnp.asarray(head_t.detach().numpy().T)}
    tx = make_optimizer(OptimConfig(learning_rate=0.01, weight_decay=decay, max_grad_norm=None,
                                    lora_plus_ratio=ratio), total_steps=2)
    state = tx.init(params)
    rng = np.random.default_rng(1)
    for _ in range(2):
        grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        for t, k in ((a_t, "lin_lora_a"), (b_t, "lin_lora_b"), (head_t, "score")):
            t.grad = torch.from_numpy(grads[k].T.copy())
        opt.step()
        updates, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    for t, k in ((a_t, "lin_lora_a"), (b_t, "lin_lora_b"), (head_t, "score")):
        np.testing.assert_allclose(np.asarray(params[k]), t.detach().numpy().T, rtol=1e-5, atol=1e-6)
