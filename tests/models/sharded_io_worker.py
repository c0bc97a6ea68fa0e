"""Sharded load/save of HF checkpoints, checked in a subprocess with simulated CPU devices (the device count
must be fixed before jax starts, so this never runs inside the pytest process):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python sharded_io_worker.py checks ROOT
  bash launch/local_multiprocess.sh 2 4 -- python sharded_io_worker.py multihost ROOT

Every check raises on failure (non-zero exit) and prints one `CHECKED <case>` line when it passes, so the
calling test can see that each case ran. Checkpoints are written under ROOT.
"""

from __future__ import annotations

import functools
import math
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from rlhf_jax.runtime import distributed  # noqa: E402

distributed.init_distributed()  # multihost: joins the peers (RLHF_JAX_* from the launcher); else no-op

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402

from rlhf_jax import fixtures  # noqa: E402
from rlhf_jax import sharding as shd  # noqa: E402
from rlhf_jax.models import (ModelConfig, Transformer, load_pretrained, logical_specs,  # noqa: E402
                             pretrained, save_pretrained)
from rlhf_jax.models.hf_io import normalize_index  # noqa: E402

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3")  # tied: gpt2, qwen2; GQA: all but gpt2; qwen3: hd != D/H
SAVE_SCANNED = ("gpt2", "qwen3")  # scanned saves compile one layer-slice program per param shape
MESHES = {  # name -> (mesh config, rules): FSDP x tensor (every big matrix split 8 ways), and replicas
    "train": (shd.MeshConfig(data=1, fsdp=4, tensor=2), shd.LOGICAL_RULES),
    "infer": (shd.MeshConfig(data=2, fsdp=2, tensor=2), shd.INFERENCE_RULES),
}


def checked(case: str) -> None:
    if jax.process_index() == 0:
        print(f"CHECKED {case}", flush=True)


# ---------------------------------------------------------------------------------------- checkpoints
def write_checkpoint(path: pathlib.Path, family: str, *, head: str = "lm", dtype=jnp.float32,
                     max_shard_size=None) -> pathlib.Path:
    """A tiny model of `family` with every param randomised (norm scales and biases too), saved as HF."""
    hf = fixtures.tiny_config(family, vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, max_positions=32)
    model = Transformer(ModelConfig.from_hf(hf, dtype=dtype, param_dtype=dtype), head=head)
    rng = np.random.default_rng(0)  # numpy draws: no compile (init_params would compile the model's init)
    abstract = pretrained._abstract_params(model.config, head)  # init's shapes; cached, load_pretrained reuses it
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), abstract)
    return save_pretrained(path, model, params, max_shard_size=max_shard_size)


# -------------------------------------------------------------------------------------- read counting
class CountingOpen:
    """Stands in for `pretrained.safe_open`; records (tensor, elements read, elements in the tensor) per read."""

    def __init__(self):
        self.reads: list[tuple[str, int, int]] = []

    def __call__(self, filename, framework):
        return _Handle(safe_open(filename, framework=framework), self.reads)


class _Handle:
    def __init__(self, inner, reads):
        self.inner, self.reads = inner, reads

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_slice(self, name):
        return _Slice(name, self.inner.get_slice(name), self.reads)


class _Slice:
    def __init__(self, name, inner, reads):
        self.name, self.inner, self.reads = name, inner, reads

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        arr = self.inner[index]
        self.reads.append((self.name, int(arr.size), math.prod(self.inner.get_shape())))
        return arr


def distinct_shard_elements(arr: jax.Array) -> int:
    """Elements of this process's distinct shards of `arr` (replicas counted once)."""
    idx = {normalize_index(i, arr.shape) for i in arr.sharding.addressable_devices_indices_map(arr.shape).values()}
    return sum(math.prod(e - s for s, e in i) for i in idx)


def load_counted(path, **kw):
    counter = CountingOpen()
    original = pretrained.safe_open
    pretrained.safe_open = counter
    try:
        model, params = load_pretrained(path, **kw)
    finally:
        pretrained.safe_open = original
    return model, params, counter.reads


# --------------------------------------------------------------------------------------------- checks
def assert_sharded_equal(case: str, sharded, ref, want_shardings) -> None:
    """Same tree, dtypes and values as `ref`; every leaf has the requested sharding; every addressable
    shard holds exactly the reference slice."""
    assert jax.tree.structure(sharded) == jax.tree.structure(ref), case
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    for kp, x in jax.tree_util.tree_leaves_with_path(sharded):
        where = f"{case} {jax.tree_util.keystr(kp)}"
        want = np.asarray(flat_ref[kp])
        sh = jax.tree_util.tree_leaves_with_path(want_shardings)
        assert x.dtype == want.dtype and x.shape == want.shape, (where, x.dtype, x.shape, want.dtype, want.shape)
        assert x.sharding == dict(sh)[kp], (where, x.sharding, dict(sh)[kp])
        for shard in x.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=where)


def assert_reads_are_slices(case: str, params, reads, *, every_big_split: bool) -> None:
    """Elements read == this process's distinct shard elements (nothing read twice, nothing extra); and,
    where the mesh splits every big matrix, no read returns more than half of one."""
    want = sum(distinct_shard_elements(x) for x in jax.tree.leaves(params))
    got = sum(n for _, n, _ in reads)
    assert got == want, f"{case}: read {got} elements, the addressable shards hold {want}"
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params)), case
    if not every_big_split:
        return
    whole = {name for name, n, total in reads if n == total}
    big = {name for name, n, total in reads if total >= 32 * 32}
    assert not (whole & big), f"{case}: whole tensors read: {sorted(whole & big)[:5]}"
    assert max(n / total for name, n, total in reads if name in big) <= 0.5, case


@functools.lru_cache(maxsize=None)
def _logical_specs(config: ModelConfig, head: str):
    return logical_specs(Transformer(config, head=head))  # one trace of init per model config


def check_load(ckpt: pathlib.Path, case: str, *, head="lm", scan=False, mesh_name="train", callable_form=False,
               **kw) -> dict:
    """Sharded load == unsharded load, with the requested shardings, reading only the shards' bytes."""
    mesh_cfg, rules = MESHES[mesh_name]
    mesh = shd.make_mesh(mesh_cfg)
    model, ref = load_pretrained(ckpt, head=head, scan_layers=scan, **kw)
    if callable_form:  # what trainers.common.load_model passes: the model is built inside load_pretrained
        asked = []
        spec = lambda m: asked.append(shd.param_shardings(m, mesh, rules=rules)) or asked[-1]  # noqa: E731
    else:
        spec = shd.logical_to_shardings(_logical_specs(model.config, head), mesh, shapes=ref, rules=rules)
    model, params, reads = load_counted(ckpt, head=head, scan_layers=scan, shardings=spec, **kw)
    assert_sharded_equal(case, params, ref, asked[0] if callable_form else spec)
    if head == "lm":
        assert_reads_are_slices(case, params, reads, every_big_split=mesh_name == "train")
    checked(case)
    return {"model": model, "params": params}


def check_save(out: pathlib.Path, ckpt: pathlib.Path, model, params, case: str, **kw) -> None:
    """Saving sharded params writes the same bytes as the checkpoint they were loaded from."""
    save_pretrained(out, model, params, **kw)
    if jax.process_index() == 0:
        files = sorted(p.name for p in ckpt.iterdir())
        assert sorted(p.name for p in out.iterdir()) == files, (case, files)
        for name in files:
            assert (out / name).read_bytes() == (ckpt / name).read_bytes(), f"{case}: {name} differs"
    checked(case)


def run_checks(root: pathlib.Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    for family in FAMILIES:
        ckpt = write_checkpoint(root / family, family)
        for scan in (False, True):
            for mesh_name in MESHES:
                case = f"load {family} scan={scan} mesh={mesh_name}"
                loaded = check_load(ckpt, case, scan=scan, mesh_name=mesh_name,
                                    callable_form=family == "llama" and mesh_name == "train")
                if mesh_name == "train" and (family in SAVE_SCANNED or not scan):
                    check_save(root / f"out-{family}-{scan}", ckpt, loaded["model"], loaded["params"],
                               f"save {family} scan={scan}")
    for family in ("llama", "gpt2"):
        ckpt = write_checkpoint(root / f"{family}-bf16", family, dtype=jnp.bfloat16)
        for scan in (False, True):
            loaded = check_load(ckpt, f"load bf16 {family} scan={scan}", scan=scan, dtype=jnp.bfloat16)
            check_save(root / f"out-bf16-{family}-{scan}", ckpt, loaded["model"], loaded["params"],
                       f"save bf16 {family} scan={scan}")
        check_load(ckpt, f"load bf16->f32 {family}", dtype=jnp.float32)
    ckpt = write_checkpoint(root / "qwen2-multi", "qwen2", max_shard_size="8KB")
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 1
    loaded = check_load(ckpt, "load multi-file qwen2", mesh_name="infer")
    check_save(root / "out-multi", ckpt, loaded["model"], loaded["params"], "save multi-file qwen2",
               max_shard_size="8KB")
    ckpt = write_checkpoint(root / "gpt2-scalar", "gpt2", head="scalar")
    loaded = check_load(ckpt, "load scalar gpt2", head="scalar")
    check_save(root / "out-scalar", ckpt, loaded["model"], loaded["params"], "save scalar gpt2")
    loaded = check_load(root / "llama", "load scalar-from-lm llama", head="scalar")
    assert not np.asarray(loaded["params"]["score"]).any()


def run_multihost(root: pathlib.Path) -> None:
    """2 processes x 4 devices: each host reads only its own shards; save gathers and process 0 writes."""
    assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.devices())
    ckpt = write_checkpoint(root / "llama", "llama")  # every process saves; process 0 writes, all wait
    for scan in (False, True):
        loaded = check_load(ckpt, f"multihost load llama scan={scan}", scan=scan)
        assert not any(x.is_fully_addressable for x in jax.tree.leaves(loaded["params"])
                       if not x.sharding.is_fully_replicated)
        check_save(root / f"out-{scan}", ckpt, loaded["model"], loaded["params"], f"multihost save llama scan={scan}")


if __name__ == "__main__":
    mode, root = sys.argv[1], pathlib.Path(sys.argv[2])
    {"checks": run_checks, "multihost": run_multihost}[mode](root)
