"""Hybrid-engine rollout layout (`rlhf_jax.rollout.layout`) and the prompt check on global arrays.

In process (1 device): the rules, the copy, the prompt-mask check modes, the HLO reader. In subprocesses:
8 simulated devices (`layout_worker.py`: no weight all-gather in the decode loop with the inference layout, the
FSDP control has them, bit-identical rollouts) and 2 processes x 4 devices (`multiprocess_worker.py`: `generate`
on global prompt arrays no process can fetch, equal to one process with 8 devices).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax.data.batching import pad_prompts
from rlhf_jax import models, rollout, sharding
from rlhf_jax.rollout import decode, layout

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import hlo_loops as H  # noqa: E402
from .conftest import tiny_config  # noqa: E402


# ------------------------------------------------------------------------------------------------ rules
def test_inference_rules_of_the_training_table_are_the_inference_rules():
    derived = layout.inference_rules(sharding.LOGICAL_RULES)
    table, ref = sharding.validate_rules(derived), sharding.validate_rules(sharding.INFERENCE_RULES)
    for name in ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "layers", "norm"):  # param names
        assert table[name] == ref[name], name
    assert layout.ROLLOUT_PARAM_RULES == sharding.INFERENCE_RULES


def test_inference_rules_strip_every_non_kept_axis():
    custom = (("embed", "fsdp"), ("mlp", ("fsdp", "tensor")), ("vocab", ("data", "tensor")), ("norm", None))
    assert layout.inference_rules(custom) == (("embed", None), ("mlp", "tensor"), ("vocab", "tensor"), ("norm", None))
    assert layout.inference_rules(custom, keep_axes=("fsdp", "tensor")) == (
        ("embed", "fsdp"), ("mlp", ("fsdp", "tensor")), ("vocab", "tensor"), ("norm", None))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        layout.inference_rules(custom, keep_axes=("model",))
    with pytest.raises(ValueError, match="more than one sharding rule"):
        layout.inference_rules(custom + (("embed", None),))


def test_reshard_copies_into_new_buffers_and_keeps_the_params():
    model = models.Transformer(tiny_config("llama"), head="lm")
    params = models.init_params(model, jax.random.key(0))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1), devices=jax.devices()[:1])
    inf_sh = rollout.inference_layout(model, mesh)
    copy = rollout.reshard_for_inference(params, inf_sh)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(copy)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer() and not a.is_deleted()
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert rollout.bytes_per_device(copy) == rollout.bytes_per_device(params) == total
    with pytest.raises(ValueError, match="different tree structures"):
        rollout.reshard_for_inference({"x": params}, inf_sh)
    with pytest.raises(ValueError, match="no sharding rule"):
        rollout.inference_layout(model, mesh, rules=(("embed", None),))


# ------------------------------------------------------------------------------------ prompt check
def _bad_mask():
    ids, mask = pad_prompts([[5, 6], [7], [8, 9, 10], [11]], pad_token_id=0, buckets=(4,))
    bad = mask.copy()
    bad[2] = 0
    return ids, mask, bad


def test_prompt_check_numpy_always_jax_arrays_by_mode(monkeypatch):
    ids, mask, bad = _bad_mask()
    monkeypatch.delenv(decode.CHECK_PROMPTS_ENV, raising=False)
    for m in (bad, jax.device_put(bad)):  # host and (fully addressable) device arrays: checked by default
        with pytest.raises(ValueError, match=r"rows \[2\] have no real token"):
            decode._check_prompts(ids, m)
    decode._check_prompts(jax.device_put(ids), jax.device_put(mask))
    with pytest.raises(ValueError, match=r"rows \[2\] have no real token"):
        decode._check_addressable_rows(jax.device_put(bad))  # what "local" runs on a multi-process array
    monkeypatch.setenv(decode.CHECK_PROMPTS_ENV, "off")
    decode._check_prompts(ids, jax.device_put(bad))  # no fetch at all
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        decode._check_prompts(ids, bad)  # host data is still checked (free)
    monkeypatch.setenv(decode.CHECK_PROMPTS_ENV, "sometimes")
    with pytest.raises(ValueError, match="RLHF_JAX_CHECK_PROMPTS='sometimes'"):
        decode._check_prompts(ids, jax.device_put(mask))


def test_generate_and_lower_generate_share_the_program(llama_model):
    model, params = llama_model
    ids, mask, bad = _bad_mask()
    kw = dict(key=jax.random.key(0), max_new_tokens=3, eos_token_id=1, pad_token_id=0)
    ro = rollout.generate(model, params, jax.device_put(ids), jax.device_put(mask), **kw)
    assert ro.response_ids_BxT.shape == (4, 3)
    assert "while" in rollout.lower_generate(model, params, ids, mask, **kw).as_text()
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        rollout.lower_generate(model, params, ids, bad, **kw)


# ------------------------------------------------------------------------------------------- HLO reader
_HLO = """HloModule m, entry_computation_layout={()->f32[]}

%fused_inner (p0: f32[4,8]) -> f32[16,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %ag = f32[16,8]{1,0} all-gather(%p0), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
}

%inner_body (t: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %t = (s32[], f32[4,8]{1,0}) parameter(0)
  %w = f32[4,8]{1,0} get-tuple-element(%t), index=1
  %g = f32[16,8]{1,0} fusion(%w), kind=kLoop, calls=%fused_inner
  ROOT %r = (s32[], f32[4,8]{1,0}) tuple(%i, %w)
}

%cond (t: (s32[], f32[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%outer_body (t: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %t = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[1,1,8]{2,1,0} get-tuple-element(%t), index=1
  %a = f32[2,1,8]{2,1,0} all-gather(%x), channel_id=2, dimensions={0}
  %nested = (s32[], f32[4,8]{1,0}) while(%t), condition=%cond, body=%inner_body
  ROOT %r = (s32[], f32[4,8]{1,0}) tuple(%i, %w)
}

ENTRY %main (p: f32[4,8]) -> f32[] {
  %p = f32[4,8]{1,0} parameter(0)
  %pre = f32[16,8]{1,0} all-gather(%p), channel_id=3, dimensions={0}
  %loop = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%outer_body, metadata={op_name="jit(f)/while"}
  ROOT %z = f32[] constant(0)
}
"""


def test_hlo_reader_finds_collectives_in_nested_bodies():
    comps = H.parse_computations(_HLO)
    assert set(comps) == {"fused_inner", "inner_body", "cond", "outer_body", "main"} and comps["main"].entry
    (loop,) = H.top_level_whiles(comps)  # the nested loop is inside the outer body, not top level
    assert (loop.computation, loop.body, loop.condition) == ("main", "outer_body", "cond")
    found = H.collectives_in(comps, loop.body, ("all-gather",))
    assert sorted(c.instruction.name for c in found) == ["a", "ag"]  # through the nested while and the fusion
    ag = next(c for c in found if c.instruction.name == "ag")
    assert ag.operand_arrays == (("f32", (4, 8)),) and ag.result_arrays == [("f32", (16, 8))]
    assert [c.instruction.name for c in found if H.weight_like(c, {128})] == ["ag"]  # [2,1,8] is not a weight
    assert [c.instruction.name for c in H.collectives_in(comps, "main", ("all-gather",))] == ["pre", "a", "ag"]


# ------------------------------------------------------------------------------------------ subprocesses
def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_JAX_") and k != "XLA_FLAGS"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
    return env


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize("cases", [("2,4,1", "2,4,1:scan"), ("2,2,2", "2,2,2:scan")], ids=["fsdp4", "fsdp2_tensor2"])
def test_inference_layout_decode_loop_has_no_weight_all_gather(cases):
    proc = subprocess.run([sys.executable, str(HERE / "layout_worker.py"), *cases], capture_output=True, text=True,
                          env=_clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "LAYOUT_OK" in proc.stdout
    results = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith("LAYOUT_RESULT")]
    assert len(results) == 2
    for r in results:
        g = r["weight_all_gathers"]
        assert g["program_inference"] == 0 and g["body_train"] + g["hoisted_train"] > 0, r
        assert r["scan_layers"] is False or g["body_train"] > 0, r


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_generate_on_global_prompts(tmp_path):
    worker = str(HERE / "multiprocess_worker.py")
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    p = subprocess.run([sys.executable, worker, "--out", str(single)], env=_clean_env(RLHF_JAX_LOCAL_DEVICE_COUNT="8"),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "2", "4", "--", sys.executable, worker,
                        "--out", str(multi)], env=_clean_env(RLHF_JAX_LAUNCH_TIMEOUT_S="500"), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert (a["process_count"], b["process_count"], a["device_count"], b["device_count"]) == (1, 2, 8, 8)
    assert a["response_ids"] == b["response_ids"]
    np.testing.assert_allclose(a["logp"], b["logp"], atol=1e-6)
    assert (a["train_bytes"], a["inference_bytes"]) == (b["train_bytes"], b["inference_bytes"])
    assert b["inference_bytes"] > b["train_bytes"]  # weights replicated over fsdp: the copy costs memory
