"""`rlhf-jax plan`: topology names, the HLO collectives parser, and whole plans of the tiny configs on cpu-8
(and on v5e:2x2 where libtpu is installed: `rlhf_jax[plan]`, or a folder named by RLHF_JAX_LIBTPU_DIR)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from rlhf_jax import fixtures
from rlhf_jax.plan.analyze import collectives, shape_bytes
from rlhf_jax.plan.cli import infer_command
from rlhf_jax.plan.topology import GIB, parse_topology

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_topology_names():
    t = parse_topology("v5e-256")
    assert (t.platform, t.num_devices, t.hbm_bytes, t.topology_name) == ("tpu", 256, 16 * GIB, "v5e:16x16")
    assert parse_topology("v4-32").num_devices == 16 and parse_topology("v4-32").topology_name == "v4:2x2x4"
    assert parse_topology("v5p-128").topology_name == "v5p:4x4x4"
    assert parse_topology("v6e-64").topology_name == "v6e:8x8"
    assert parse_topology("v5e:2x4").num_devices == 8
    assert parse_topology("v5e-16", num_slices=2).num_devices == 32
    cpu = parse_topology("cpu-8", hbm_gib=2)
    assert (cpu.platform, cpu.num_devices, cpu.hbm_bytes) == ("cpu", 8, 2 * GIB)
    assert "not a GPU or TPU compile" in cpu.estimate_note
    h100 = parse_topology("h100-8")
    assert (h100.platform, h100.num_devices, h100.hbm_bytes) == ("cpu", 8, 81559 * 2 ** 20)
    assert "NOT a GPU compile" in h100.estimate_note and "XLA_PYTHON_CLIENT_MEM_FRACTION" in h100.estimate_note
    for bad in ("v9-8", "v4-3", "v5e:2x2x2", "tpu"):
        with pytest.raises(ValueError, match="topology|TensorCores|grid|power"):
            parse_topology(bad)


def test_collectives_parser_counts_bytes():
    hlo = "\n".join([
        "  %all-gather.8 = bf16[1024,512]{1,0} all-gather(%convert), channel_id=5, dimensions={0}",
        "  %ars = (f32[8,4]{1,0}, f32[32,4]{1,0}) all-gather-start(%p), channel_id=1",
        "  %agd = f32[32,4]{1,0} all-gather-done(%ars)",
        "  %all-reduce.1 = f32[512,1024]{1,0} all-reduce(%fusion), to_apply=%add",
        "  %rs = (f32[16]{0}, s32[2]{0}) reduce-scatter(%a, %b), dimensions={0}",
        "  %add = f32[4] add(%x, %y)",
    ])
    c = collectives(hlo)
    assert c["all-gather"] == {"count": 2, "bytes": 1024 * 512 * 2 + 32 * 4 * 4}  # -done not counted again
    assert c["all-reduce"] == {"count": 1, "bytes": 512 * 1024 * 4}
    assert c["reduce-scatter"] == {"count": 1, "bytes": 16 * 4 + 2 * 4}
    assert shape_bytes("pred[3]") == 3 and "collective-permute" not in c


def test_fused_dot_scratch_counts_dots_inside_fusions_only():
    from rlhf_jax.plan.analyze import fused_dot_scratch

    hlo = "\n".join([
        "%fused_computation.17 (param_0: f32[256,64], param_1: f32[64,4096]) -> f32[256] {",
        "  %dot.1 = f32[256,4096]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}",
        "}",
        "%fused_computation.3 (p: bf16[8,16]) -> bf16[8,8] {",
        "  %dot.2 = bf16[8,8]{1,0} dot(%p, %p), lhs_contracting_dims={1}",
        "}",
        "ENTRY %main.155 (a: f32[512,64], b: f32[64,4096]) -> f32[512,4096] {",
        "  %dot.3 = f32[512,4096]{1,0} dot(%a, %b), lhs_contracting_dims={1}",  # in the buffer assignment
        "}",
    ])
    assert fused_dot_scratch(hlo) == 256 * 4096 * 4


def test_infer_command():
    assert infer_command("configs/online_dpo_tiny_cpu.yaml") == "online_dpo"
    assert infer_command("x/dpo_ipo_tiny_cpu.yaml") == "dpo"
    assert infer_command("kto_tiny_cpu.yaml") == "dpo"
    assert infer_command("grpo_dapo_tiny_cpu.yaml") == "grpo"
    with pytest.raises(ValueError, match="--command"):
        infer_command("my_run.yaml")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    """A tiny Llama's config.json only: a plan reads no weights."""
    d = tmp_path_factory.mktemp("plan") / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(fixtures.tiny_config("llama", vocab_size=4096, hidden=64, layers=2)))
    return d


def _plan(config: str, topology: str, tmp_path, *overrides: str, env_extra=None):
    out = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax", "plan", str(ROOT / "configs" / config), *overrides,
                           "--topology", topology, "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=900)
    return proc, (json.loads(out.read_text()) if proc.returncode == 0 else None)


def _param_bytes(n_layers=2, hidden=64, vocab=4096, inter=192, kv=2, heads=4, head_dim=16, head="lm") -> int:
    """Hand count of the tiny Llama's f32 params (untied embeddings)."""
    attn = hidden * heads * head_dim + 2 * hidden * kv * head_dim + heads * head_dim * hidden
    layer = attn + 3 * hidden * inter + 2 * hidden
    out = vocab * hidden if head == "lm" else hidden
    return 4 * (vocab * hidden + n_layers * layer + hidden + out)


@pytest.mark.parametrize("config,command_programs", [
    ("sft_tiny_cpu.yaml", ["train_step"]),
    ("dpo_tiny_cpu.yaml", ["reference_logps", "train_step"]),
    ("ppo_tiny_cpu.yaml", ["generate", "reward_model", "evaluate_rollout", "make_experience", "update"]),
    ("grpo_tiny_cpu.yaml", ["generate", "evaluate_rollout", "make_experience", "update"]),
])
def test_plan_tiny_configs_on_cpu8(config, command_programs, tiny_model, tmp_path):
    rm = [f"reward.model_path={tiny_model}"] if config.startswith("ppo") else []
    proc, rep = _plan(config, "cpu-8", tmp_path, f"model.path={tiny_model}", *rm)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = [p["name"] for p in rep["programs"]]
    assert names[:len(command_programs)] == command_programs or set(command_programs) <= set(names)
    assert rep["num_devices"] == 8 and rep["platform"] == "cpu" and "not a GPU or TPU compile" in rep["note"]
    assert "program" in proc.stdout and "largest contributors" in proc.stdout and rep["fits"]
    params = [v for k, v in rep["contributors"].items() if k.endswith("params") and k.split()[0] in ("policy", "actor")]
    assert params == [_param_bytes()]  # replicated over the data axis: the whole model on each chip
    for p in rep["programs"]:
        assert p["peak"] == (p["arguments"] + p["outputs"] - p["aliased"] + p["temporaries"] + p["runtime_scratch"]
                             + p["other_resident"])
        assert p["flops"] > 0 or p["name"] == "make_experience"
    train = next(p for p in rep["programs"] if p["name"] in ("train_step", "update"))
    assert train["collectives"]["all-reduce"]["bytes"] >= _param_bytes()  # the gradient all-reduce over data
    assert rep["peak"] == max(p["peak"] for p in rep["programs"])


def _ilql_heads_bytes(hidden=64, vocab=4096) -> int:
    """Hand count of trlx's ILQL heads: Linear(D, 2D) -> Linear(2D, out) for 2 Q, 2 target Q (out V) and V (out 1)."""
    mlp = lambda out: hidden * 2 * hidden + 2 * hidden + 2 * hidden * out + out  # noqa: E731
    return 4 * (4 * mlp(vocab) + mlp(1))


@pytest.mark.parametrize("config,overrides,programs", [
    ("superhf_tiny_cpu.yaml", [], ["generate", "reference_logps", "sft_step"]),
    ("ilql_tiny_cpu.yaml", [], ["train_step", "generate_eval_greedy", "generate_eval_sampled"]),
    ("critique_tiny_cpu.yaml", ["helper_model={model}"], ["generate", "generate_critique_revision"]),
    ("label_tiny_cpu.yaml", ["ranker=pairwise_judge", "num_samples=2", "pairwise_judge.model_path={model}",
                             "pairwise_judge.max_len=48"], ["generate", "pairwise_judge"]),
])
def test_plan_other_commands_on_cpu8(config, overrides, programs, tiny_model, tmp_path):
    ovr = [o.format(model=tiny_model) for o in overrides]
    proc, rep = _plan(config, "cpu-8", tmp_path, f"model.path={tiny_model}", *ovr, "--no-knobs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p["name"] for p in rep["programs"]] == programs and rep["fits"]
    c = rep["contributors"]
    for p in rep["programs"]:
        assert p["flops"] > 0 and p["arguments"] >= _param_bytes() and p["peak"] >= p["program_peak"]
    if config.startswith("superhf"):  # the frozen float32 starting policy: resident, read by reference_logps only
        assert c["reference"] == _param_bytes() and c["actor params"] == _param_bytes()
        assert rep["programs"][1]["other_resident"] == c["actor params"] + c["actor optimizer state"]
    elif config.startswith("ilql"):  # one state: the LM and its five heads
        assert c["policy params"] == _param_bytes() + _ilql_heads_bytes()
        assert rep["programs"][0]["arguments"] >= 3 * c["policy params"]  # params + Adam's two moments
    elif config.startswith("critique"):
        assert c["policy params"] == c["helper params"] == _param_bytes()
        assert rep["programs"][1]["other_resident"] == _param_bytes()  # the policy, idle while the helper samples
    else:
        assert c["judge"] == _param_bytes() and rep["programs"][1]["other_resident"] == _param_bytes()


def test_plan_mesh_must_match_topology(tiny_model, tmp_path):
    proc, _ = _plan("sft_tiny_cpu.yaml", "cpu-4", tmp_path, f"model.path={tiny_model}", "mesh.data=8")
    assert proc.returncode == 2
    assert "topology cpu-4 (4 chips)" in proc.stderr and "has 8 devices" in proc.stderr  # names both counts


def _libtpu_env() -> dict | None:
    if importlib.util.find_spec("libtpu") is not None:
        return {}
    d = os.environ.get("RLHF_JAX_LIBTPU_DIR")
    return {"RLHF_JAX_LIBTPU_DIR": d} if d and (pathlib.Path(d) / "libtpu").is_dir() else None


@pytest.mark.skipif(_libtpu_env() is None, reason="libtpu not installed (pip install 'rlhf_jax[plan]')")
def test_plan_tiny_ppo_on_v5e_2x2(tiny_model, tmp_path):
    proc, rep = _plan("ppo_tiny_cpu.yaml", "v5e:2x2", tmp_path, f"model.path={tiny_model}",
                      f"reward.model_path={tiny_model}", env_extra=_libtpu_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rep["platform"] == "tpu" and rep["num_devices"] == 4 and rep["hbm_bytes"] == 16 * GIB
    assert [p["name"] for p in rep["programs"]] == ["generate", "reward_model", "evaluate_rollout", "make_experience",
                                                    "update"]
    assert rep["fits"] and rep["contributors"]["actor params"] == _param_bytes()


def test_knob_candidates_are_the_configs_own_settings(tiny_model):
    from rlhf_jax.plan.knobs import candidates
    from rlhf_jax.recipes import load_trainer_config

    ppo = load_trainer_config("ppo", str(ROOT / "configs/ppo_tiny_cpu.yaml"),
                              [f"model.path={tiny_model}", f"reward.model_path={tiny_model}"])
    assert candidates("ppo", ppo) == ["model.remat=full", "model.dtype=bfloat16", "frozen_dtype=bfloat16",
                                      "ppo.num_micro_batches=2", "rollout.batch_size=16", "mesh.fsdp=-1"]
    sft = load_trainer_config("sft", str(ROOT / "configs/sft_tiny_cpu.yaml"),
                              [f"model.path={tiny_model}", "model.remat=full", "mesh.data=1", "mesh.fsdp=-1"])
    assert candidates("sft", sft) == ["model.dtype=bfloat16", "num_micro_batches=2"]
