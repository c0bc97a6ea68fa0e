"""The compile process of ``rlhf-jax plan`` (started by :mod:`rlhf_jax.plan.cli` with the topology's devices)."""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

import jax

from rlhf_jax.plan.knobs import with_knobs
from rlhf_jax.plan.run import format_report, plan
from rlhf_jax.plan.topology import parse_topology


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Worker entry: ``python -m rlhf_jax.plan.worker COMMAND CONFIG TOPOLOGY NUM_SLICES HBM_GIB JSON [overrides]``."""
    from rlhf_jax.recipes import load_trainer_config

    command, config, topo_name, slices, hbm, out, knobs, *overrides = list(sys.argv[1:] if argv is None else argv)
    topo = parse_topology(topo_name, num_slices=int(slices), hbm_gib=float(hbm) if hbm != "-" else None)
    cfg = load_trainer_config(command, config, overrides)
    rep = plan(command, cfg, topo)
    if knobs == "1":
        rep = with_knobs(rep, command, config, overrides, topo)
    print(format_report(rep), flush=True)
    if out != "-":
        with open(out, "w") as f:
            json.dump(rep, f, indent=2)
    return 0


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    raise SystemExit(main())
