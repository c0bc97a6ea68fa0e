"""Every command on 2 processes × 4 simulated devices gives the same metrics as 1 process × 8 devices.

Real ``jax.distributed`` runs through ``launch/local_multiprocess.sh`` (gloo collectives on 127.0.0.1),
``data × fsdp`` spanning the processes and ``tensor`` within one; the same global batch and seed, so
losses, scores and KL agree to float rounding (rtol 1e-5). One set of outputs is written by process 0.

The PPO and GRPO pairs of runs are made once per module (``online_pair``) and checked by several tests:
2 × 4 equals 1 × 8, the held-out evaluation on 2 × 4 equals 1 × 8, and (GRPO, checkpointed every
iteration) their checkpoints resume on the other layout.

The helpers live in ``_compare.py``; the names below stay importable from this module.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from _compare import (DENSE, MESH, ROOT, _commands, _online, _run, _values, assert_runs_equal,  # noqa: F401
                      assets, launch)

GOLD = "reward.gold_function=rlhf_jax.tasks:gold_score"
SHARED = ("ppo", "grpo")  # commands whose pair of runs `online_pair` makes once for several tests


@pytest.fixture(scope="module")
def heldout(assets, tmp_path_factory) -> str:  # noqa: F811
    """Five held-out prompts: the last evaluation batch is partly padding, and for GRPO (2 prompts per host
    per batch) one host's slice of it is all padding."""
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    path.write_text("\n".join(pathlib.Path(assets["prompts_eval"]).read_text().splitlines()[:5]) + "\n")
    return str(path)


def _shared_overrides(assets: dict, heldout: str, command: str) -> tuple[str, list[str]]:
    config, overrides = _commands(assets)[command]
    extra = [f"data.eval_path={heldout}", "run.eval_every=1", GOLD]
    return config, overrides + extra + (["run.save_every=1"] if command == "grpo" else [])


@pytest.fixture(scope="module")
def online_pair(assets, heldout, tmp_path_factory):  # noqa: F811
    """command -> (folder, 1 × 8 records, 2 × 4 records) of a 2-iteration run of `command` with the held-out
    evaluation on (GRPO also checkpointed every iteration), in folder/one and folder/two; made on first use."""
    made = {}

    def get(command: str) -> tuple[pathlib.Path, list[dict], list[dict]]:
        if command not in made:
            config, overrides = _shared_overrides(assets, heldout, command)
            out = tmp_path_factory.mktemp(f"pair_{command}")
            made[command] = (out, _run(command, config, overrides, out / "one", 1, 8),
                             _run(command, config, overrides, out / "two", 2, 4))
        return made[command]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "ppo", "grpo", "rloo", "reinforce_pp", "remax", "raft",
                                     "online_dpo"])
def test_two_processes_equal_one(command, assets, online_pair, tmp_path):  # noqa: F811
    if command in SHARED:
        out, one, two = online_pair(command)
    else:
        config, overrides = _commands(assets)[command]
        out = tmp_path
        one = _run(command, config, overrides, out / "one", 1, 8)
        two = _run(command, config, overrides, out / "two", 2, 4)
    assert_runs_equal(_values(one), _values(two), command)
    assert (out / "two" / "model" / "config.json").exists()  # process 0 exported


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ppo", "grpo"])
def test_heldout_eval_two_processes_equal_one(command, online_pair):
    """Each host samples and scores its slice of every held-out prompt batch; the statistics are over every
    host's prompts."""
    out, one, two = online_pair(command)
    ev1 = _values([r for r in one if r["split"] == "eval"])
    ev2 = _values([r for r in two if r["split"] == "eval"])
    assert [r["step"] for r in ev1] == [1, 2] == [r["step"] for r in ev2]
    assert all({"score", "gold_score", "sampled_score", "response_length", "eos_rate"} <= r.keys() for r in ev1)
    assert_runs_equal(ev1, ev2, f"{command} eval")
    assert_runs_equal(_values([r for r in one if r["split"] == "train"]),
                      _values([r for r in two if r["split"] == "train"]), f"{command} train")
    assert json.loads((out / "two" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


@pytest.mark.slow
def test_out_in_decode_copy_on_two_processes_equals_the_training_layout(assets, heldout, online_pair, tmp_path):  # noqa: F811
    """``rollout.weight_layout: out_in`` (the sampler transposes the actor to ``[out, in]`` each iteration, in the
    program that reshards it for inference) on 2 × 4 gives the metrics of the training-layout run on 1 × 8."""
    _, one, _ = online_pair("grpo")
    config, overrides = _shared_overrides(assets, heldout, "grpo")
    two = _run("grpo", config, overrides + ["rollout.weight_layout=out_in"], tmp_path / "two", 2, 4)
    assert_runs_equal(_values(one), _values(two), "grpo out_in")


@pytest.mark.slow
def test_label_two_processes_write_one_file_equal_to_one_process(assets, tmp_path):  # noqa: F811
    """Each host labels its slice of every prompt batch; process 0 writes every host's rows in prompt order."""
    overrides = [f"model.path={assets['model']}", f"data.path={assets['prompts_eval']}", "rollout.batch_size=6",
                 "rollout.max_new_tokens=8", DENSE, "reward.weights=[1.0]"]
    rows = {}
    for procs, devices in ((1, 8), (2, 4)):
        out = tmp_path / f"{procs}x{devices}.jsonl"
        launch("label", "label_tiny_cpu.yaml", overrides + [f"output_path={out}"], procs, devices)
        rows[procs] = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows[1]) > 0
    assert [r["prompt"] for r in rows[2]] == [r["prompt"] for r in rows[1]]
    for a, b in zip(rows[1], rows[2]):
        assert (a["chosen"], a["rejected"]) == (b["chosen"], b["rejected"])
        assert b["score_chosen"] == pytest.approx(a["score_chosen"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_resume_across_process_counts(assets, heldout, online_pair, tmp_path):  # noqa: F811
    """GRPO checkpointed on 2 x 4 after 2 iterations resumes on 1 x 8 (and a 1 x 8 checkpoint on 2 x 4) at the
    same global step with the same data order: iteration 3 (and its held-out evaluation) equals the
    uninterrupted 1 x 8 run's. The checkpointed runs are `online_pair`'s, resumed from copies."""
    config, overrides = _shared_overrides(assets, heldout, command := "grpo")
    pair, _, _ = online_pair(command)
    straight = _run(command, config, overrides + ["run.total_steps=3"], tmp_path / "straight", 1, 8)
    last = {r["split"]: _values([r])[0] for r in straight if r["step"] == 3}
    assert sorted(last) == ["eval", "train"]
    for first, then in (((2, 4), (1, 8)), ((1, 8), (2, 4))):
        out = tmp_path / f"{first[0]}to{then[0]}"
        shutil.copytree(pair / {1: "one", 2: "two"}[first[0]], out)  # 2 iterations, checkpointed
        resumed = _run(command, config, overrides + ["run.total_steps=3"], out, *then)
        train = [r for r in resumed if r["split"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3]  # steps 1-2 kept, 3 appended once
        for split, expected in last.items():
            got = _values([r for r in resumed if r["split"] == split and r["step"] == 3])
            assert len(got) == 1, (first, then, split, resumed)
            for k, v in expected.items():
                assert got[0][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (first, then, split, k, v, got[0][k])
