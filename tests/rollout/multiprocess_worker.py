"""The sampler on a (data=2, fsdp=4, tensor=1) mesh whose batch spans every process (not collected by pytest).

Started by test_layout.py alone with 8 devices, or as 2 processes x 4 devices through launch/local_multiprocess.sh.
Each process shards its half of the prompts (`shard_batch`); the prompt arrays are then global arrays that no
process can fetch. Checks that `generate` accepts them (it used to `np.asarray` the mask), that the training
layout and the `reshard_for_inference` copy give identical rollouts, and that `RLHF_JAX_CHECK_PROMPTS=local`
checks a process's own rows; process 0 writes the gathered rollout as JSON.

  python tests/rollout/multiprocess_worker.py --out result.json
"""

import argparse
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(_HERE))]  # rlhf_jax

from rlhf_jax.data.batching import pad_prompts
from rlhf_jax.runtime import distributed as D  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    info = D.init_distributed(timeout_s=60)
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from rlhf_jax import fixtures, models, rollout, sharding
    from rlhf_jax.rollout import decode

    jax.config.update("jax_default_matmul_precision", "highest")
    D.wait_for_peers("startup", timeout_s=60)
    config = models.ModelConfig.from_hf(fixtures.tiny_config("llama", vocab_size=120, hidden=32, max_positions=128))
    model = models.Transformer(config.replace(initializer_range=0.2), head="lm")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4, tensor=1))
    train_sh = sharding.param_shardings(model, mesh)
    params = sharding.create_sharded(lambda k: models.init_params(model, k), jax.random.key(0), out_shardings=train_sh)

    rows = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 33)), [40], [50, 51, 52], [60] * 7, [70, 71], [80, 81, 82, 83]]
    ids, mask = pad_prompts(rows, pad_token_id=0, buckets=(16,))
    shard, num_shards = sharding.host_data_shard(mesh)
    local = lambda x: np.split(x, num_shards)[shard]  # noqa: E731
    batch = sharding.shard_batch({"ids": local(ids), "mask": local(mask)}, mesh)
    if info.process_count > 1:
        assert not batch["mask"].is_fully_addressable
        try:  # what _check_prompts used to do
            np.asarray(batch["mask"])
        except RuntimeError as e:
            assert "non-addressable" in str(e), e
        else:
            raise AssertionError("expected a global array no process can fetch")

    # "local": each process checks its own rows; a bad row raises on its owner only (no collective follows here)
    bad = local(mask).copy()
    if info.process_index == info.process_count - 1:
        bad[-1] = 0
    bad_global = sharding.shard_batch({"m": bad}, mesh)["m"]
    os.environ[decode.CHECK_PROMPTS_ENV] = "local"
    decode._check_prompts(batch["ids"], batch["mask"])
    raised = None
    try:
        decode._check_prompts(batch["ids"], bad_global)
    except ValueError as e:
        raised = str(e)
    owner = info.process_index == info.process_count - 1
    assert (raised is not None) == owner, (info.process_index, raised)
    if owner:
        assert "rows [7] have no real token" in raised, raised
    os.environ.pop(decode.CHECK_PROMPTS_ENV)

    inf_sh = rollout.inference_layout(model, mesh)
    kw = dict(key=jax.random.key(3), max_new_tokens=6, eos_token_id=1, pad_token_id=0, temperature=1.0,
              batch_sharding=sharding.batch_sharding(mesh))
    with D.watchdog("generate", timeout_s=300), sharding.mesh_context(mesh):
        ro_train = rollout.generate(model, params, batch["ids"], batch["mask"], param_shardings=train_sh, **kw)
        inf_params = rollout.reshard_for_inference(params, inf_sh)
        ro_inf = rollout.generate(model, inf_params, batch["ids"], batch["mask"], param_shardings=inf_sh, **kw)
        fields = ("response_ids_BxT", "logp_BxT")
        a = {f: multihost_utils.process_allgather(getattr(ro_train, f), tiled=True) for f in fields}
        b = {f: multihost_utils.process_allgather(getattr(ro_inf, f), tiled=True) for f in fields}
    for f in a:
        np.testing.assert_array_equal(a[f], b[f], err_msg=f)
    result = dict(process_count=jax.process_count(), device_count=jax.device_count(),
                  train_bytes=rollout.bytes_per_device(params), inference_bytes=rollout.bytes_per_device(inf_params),
                  response_ids=a["response_ids_BxT"].tolist(), logp=a["logp_BxT"].tolist())
    print(f"result process {info.process_index}: bytes/device train {result['train_bytes']} "
          f"inference {result['inference_bytes']}", flush=True)
    if D.is_main_process():
        with open(args.out, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
