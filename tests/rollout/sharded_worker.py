"""Run by test_sharded.py in a subprocess with 8 simulated CPU devices (not collected by pytest).

Generates on a (data=2, fsdp=2, tensor=2) mesh with params sharded by `rlhf_jax.sharding` and checks the
result against the same call on one device: identical greedy tokens, log-probs within 1e-5, sampled
log-probs equal to a teacher-forced forward, outputs sharded over the batch.
"""

import sys

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from rlhf_jax.data.batching import pad_prompts
from rlhf_jax import fixtures, models, ops, rollout, sharding  # noqa: E402


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    config = models.ModelConfig.from_hf(fixtures.tiny_config("llama", vocab_size=96, hidden=32, max_positions=128))
    model = models.Transformer(config.replace(initializer_range=0.2), head="lm")
    params = models.init_params(model, jax.random.key(0))
    ids, mask = pad_prompts([[5, 6, 7, 8, 9], [10, 11], list(range(20, 33)), [40]], pad_token_id=0,
                                    buckets=(16,))
    kw = dict(max_new_tokens=8, eos_token_id=1, pad_token_id=0)
    ref_greedy = rollout.generate(model, params, ids, mask, key=jax.random.key(0), temperature=0.0, **kw)

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    p_sh = sharding.param_shardings(model, mesh)
    b_sh = sharding.batch_sharding(mesh)
    sharded_params = jax.device_put(params, p_sh)
    with sharding.mesh_context(mesh):
        greedy = rollout.generate(model, sharded_params, ids, mask, key=jax.random.key(0), temperature=0.0,
                                  param_shardings=p_sh, batch_sharding=b_sh, **kw)
        sampled = rollout.generate(model, sharded_params, ids, mask, key=jax.random.key(3), temperature=1.0,
                                   param_shardings=p_sh, batch_sharding=b_sh, **kw)
    np.testing.assert_array_equal(greedy.response_ids_BxT, ref_greedy.response_ids_BxT)
    np.testing.assert_allclose(greedy.logp_BxT, ref_greedy.logp_BxT, atol=1e-5)
    assert greedy.response_ids_BxT.sharding.is_equivalent_to(b_sh, 2), greedy.response_ids_BxT.sharding
    logits = model.apply({"params": params}, np.asarray(sampled.ids_BxS), np.asarray(sampled.mask_BxS))
    tf = ops.token_logprobs(logits[:, sampled.prompt_length - 1 : -1], np.asarray(sampled.response_ids_BxT))
    m = np.asarray(sampled.response_mask_BxT, bool)
    np.testing.assert_allclose(np.asarray(sampled.logp_BxT)[m], np.asarray(tf)[m], atol=1e-5)
    print("SHARDED_OK", flush=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
