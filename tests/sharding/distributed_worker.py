"""One SFT step on a (data, fsdp, tensor) mesh spanning every process; process 0 writes
{loss, checksum} as JSON. Started by test_distributed.py, either alone with 8 devices or as 2
processes x 4 devices through launch/local_multiprocess.sh.

  python tests/sharding/distributed_worker.py --out result.json [--mesh 2,2,2] [--die-process 1]
"""

import argparse
import json
import os
import signal
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(os.path.dirname(_HERE))]  # sharding_harness, rlhf_jax

from rlhf_jax.runtime import distributed as D  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mesh", default="2,2,2")
    ap.add_argument("--die-process", type=int, default=-1, help="this process SIGKILLs itself after init")
    ap.add_argument("--peer-timeout", type=float, default=60.0)
    ap.add_argument("--step-timeout", type=float, default=300.0)
    args = ap.parse_args()

    info = D.init_distributed(timeout_s=60)
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    print(f"started {info}", flush=True)
    if info.process_index == args.die_process:
        os.kill(os.getpid(), signal.SIGKILL)
    D.wait_for_peers("startup", timeout_s=args.peer_timeout)

    import sharding_harness as H
    from rlhf_jax import sharding as shd

    mesh = shd.make_mesh(shd.MeshConfig.parse(args.mesh))
    prob = H.problems(batch_size=16)["sft"]
    shard, num_shards = shd.host_data_shard(mesh)
    local = jax.tree.map(lambda x: np.split(x, num_shards)[shard], prob.batch)
    with D.watchdog("first train step", timeout_s=args.step_timeout):
        (loss, _, params, _), _, _ = H.run_sharded(prob._replace(batch=local), jax.random.key(0), mesh, fetch=False)
        total = H.checksum(params)
        jax.block_until_ready((loss, total))
    result = dict(loss=float(loss), checksum=float(total), process_count=jax.process_count(),
                  device_count=jax.device_count(), data_shard=[shard, num_shards])
    print(f"result {result}", flush=True)
    if D.is_main_process():
        with open(args.out, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
