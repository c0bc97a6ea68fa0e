"""Topologies a plan compiles for: TPU slices named as MaxText names them, and ``cpu-N``.

* ``v5e-256``, ``v6e-64``: chip counts (v5e / v6e have one TensorCore per chip, 2D torus).
* ``v4-32``, ``v5p-128``: TensorCore counts, as Cloud TPU names them (2 cores per chip: v4-32 = 16 chips, 3D).
* ``v5e:4x4``, ``v4:2x2x2``: an explicit chip grid, passed to ``jax.experimental.topologies`` as is.
* ``cpu-N``: N simulated host devices (``--xla_force_host_platform_device_count``). A ``cpu-N`` plan
  estimates memory with the XLA:CPU compiler; it is NOT a GPU (or TPU) compile: fusion, layouts and
  collectives differ. Use it when libtpu is not installed, or for GPU-like meshes.
* ``h100-N``, ``h200-N``: ``cpu-N`` compared against that GPU's memory (H100 80GB: 81,559 MiB; H200: 143,771 MiB,
  as ``nvidia-smi`` reports them) — still an XLA:CPU estimate, not a GPU compile (``--hbm-gib`` does the same
  for any chip).

TPU topologies need libtpu (``pip install 'rlhf_jax[plan]'``): it compiles for abstract TPU devices on a
CPU host (``get_topology_desc``); no TPU is touched.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 1024 ** 3

#: GPU name -> memory per GPU (nvidia-smi's total) for the ``h100-N`` / ``h200-N`` CPU-compiler estimates
GPU_MEMORY = {"h100": 81559 * 1024 ** 2, "h200": 143771 * 1024 ** 2}

#: generation -> (HBM bytes per chip, TensorCores per chip as counted in the slice name, grid rank)
TPU_CHIPS = {
    "v4": (32 * GIB, 2, 3),
    "v5p": (95 * GIB, 2, 3),
    "v5e": (16 * GIB, 1, 2),
    "v6e": (32 * GIB, 1, 2),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """What a plan compiles for.

    Attributes:
      name: as given (``v5e-256``, ``cpu-8``).
      platform: ``"tpu"`` or ``"cpu"``.
      num_devices: devices (chips) over all slices.
      hbm_bytes: memory per device the plan compares against (TPU: the chip's HBM; cpu-N: host RAM / N).
      topology_name: the ``get_topology_desc`` name (``v5e:16x16``); None for cpu.
      num_slices: slices (multi-slice over DCN).
    """

    name: str
    platform: str
    num_devices: int
    hbm_bytes: int
    topology_name: str | None = None
    num_slices: int = 1

    @property
    def estimate_note(self) -> str:
        gpu = self.name.split("-")[0].lower()
        if self.platform == "cpu" and gpu in GPU_MEMORY:
            return (f"{self.name}: an XLA:CPU estimate on {self.num_devices} simulated host devices compared against "
                    f"{self.hbm_bytes / GIB:.1f} GiB per {gpu.upper()}; this is NOT a GPU compile (fusion, layouts, "
                    "collectives and cuBLAS workspaces differ), and JAX on GPU only uses 75% of the memory unless "
                    "XLA_PYTHON_CLIENT_MEM_FRACTION is raised")
        if self.platform == "cpu":
            return (f"{self.name}: memory estimated with the XLA:CPU compiler on {self.num_devices} simulated host "
                    "devices; this is not a GPU or TPU compile (fusion, layouts and collectives differ)")
        return f"{self.name}: compiled by libtpu for {self.num_devices} abstract TPU {self.name.split('-')[0].split(':')[0]} chips"


def _grid(chips: int, rank: int) -> str:
    """A power-of-two chip grid as the slice shapes Cloud TPU offers (v5e-256 -> 16x16, v4 16 chips -> 2x2x4)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"chip count {chips} is not a power of two; give the grid explicitly (e.g. v5e:2x4)")
    k = int(math.log2(chips))
    if rank == 2:
        a = k // 2
        return f"{2 ** a}x{2 ** (k - a)}"
    dims = [1, 1, 1]
    for i in range(k):  # 4 chips -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4
        dims[i % 3] *= 2
    return "x".join(str(d) for d in (dims if k <= 2 else sorted(dims)))


def host_memory_bytes() -> int:
    """Physical RAM of this host (what cpu-N devices share)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_topology(name: str, *, num_slices: int = 1, hbm_gib: float | None = None) -> Topology:
    """``v5e-256`` / ``v4-32`` / ``v5e:4x4`` / ``cpu-8`` -> :class:`Topology`.

    Raises:
      ValueError: an unknown generation or a malformed name, naming the accepted forms.
    """
    text = name.strip().lower()
    if num_slices < 1:
        raise ValueError(f"--num-slices must be >= 1, got {num_slices}")
    m = re.fullmatch(r"cpu-(\d+)", text)
    if m:
        n = int(m.group(1)) * num_slices
        hbm = int(hbm_gib * GIB) if hbm_gib else host_memory_bytes() // max(n, 1)
        return Topology(name, "cpu", n, hbm, None, num_slices)
    m = re.fullmatch(r"(h100|h200)-(\d+)", text)
    if m:
        n = int(m.group(2)) * num_slices
        return Topology(name, "cpu", n, int(hbm_gib * GIB) if hbm_gib else GPU_MEMORY[m.group(1)], None, num_slices)
    m = re.fullmatch(r"(v4|v5p|v5e|v6e|v5litepod)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", text)
    if not m:
        raise ValueError(f"unknown topology {name!r}; use a TPU slice (v5e-256, v6e-64, v4-32, v5p-128), an explicit "
                         "grid (v5e:4x4, v4:2x2x2), cpu-N (N simulated host devices) or h100-N / h200-N (cpu-N against that "
                         "GPU's memory)")
    gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    hbm, cores, rank = TPU_CHIPS[gen]
    if m.group(2):
        count = int(m.group(2))
        if count % cores:
            raise ValueError(f"topology {name!r}: {gen} slice names count TensorCores ({cores} per chip); "
                             f"{count} is not a multiple of {cores}")
        grid = _grid(count // cores, rank)
    else:
        grid = m.group(3)
        if len(grid.split("x")) != rank:
            raise ValueError(f"topology {name!r}: {gen} chips form a {rank}-D grid, e.g. "
                             f"{'2x2' if rank == 2 else '2x2x2'}")
    chips = math.prod(int(d) for d in grid.split("x"))
    hbm = int(hbm_gib * GIB) if hbm_gib else hbm
    return Topology(name, "tpu", chips * num_slices, hbm, f"{gen}:{grid}", num_slices)


def topology_devices(topo: Topology) -> list:
    """The devices to build the mesh on: abstract TPU devices (libtpu) or this process's CPU devices.

    For cpu-N the process must have been started with ``--xla_force_host_platform_device_count=N``
    (``rlhf_jax.plan.cli`` starts the compile in such a child process).
    """
    import jax

    if topo.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) != topo.num_devices:
            raise ValueError(f"{topo.name}: this process has {len(devices)} CPU devices, want {topo.num_devices} "
                             "(start it with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        return list(devices)
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - very old jax
        raise ValueError(f"{topo.name}: jax.experimental.topologies is not available ({e})") from None
    kwargs = {"num_slices": topo.num_slices} if topo.num_slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(topology_name=topo.topology_name, platform="tpu", **kwargs)
    except Exception as e:  # libtpu missing or the name unknown to it
        raise ValueError(f"{topo.name}: cannot build the TPU topology {topo.topology_name} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); install libtpu with "
                         "`pip install 'rlhf_jax[plan]'`, or plan on cpu-N") from None
    return list(desc.devices)
