"""Tests for `rlhf-jax critique` (SL-CAI): principles, draws, conversation rendering, and (slow) one pass whose
output trains `rlhf-jax sft` directly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhf_jax import cai_demo, cli
from rlhf_jax.config import ConfigError, load_config
from rlhf_jax.data import DataConfig, build_data
from rlhf_jax.recipes import critique
from rlhf_jax.train import run as common

BASE = ("model.path=x", "data.path=y", "output_path=out/rev.jsonl")


def test_principles_inline_or_from_yaml(tmp_path):
    cfg = load_config(critique.CritiqueConfig, None, BASE + ("principles=[{critique: ' C?', revision: ' R:'}]",))
    assert critique.load_principles(cfg) == (critique.Principle(" C?", " R:"),)
    cfg = load_config(critique.CritiqueConfig, None, BASE + ("principles_path=configs/constitutions/toy.yaml",))
    assert len(critique.load_principles(cfg)) == 2 and cfg.trace_file.name == "rev.trace.jsonl"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- critique: x\n  revisoin: y\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: entry 0"):
        critique.load_principles(load_config(critique.CritiqueConfig, None, BASE + (f"principles_path={bad}",)))


def test_config_errors():
    with pytest.raises(ConfigError, match="principles"):
        load_config(critique.CritiqueConfig, None, BASE)  # neither
    with pytest.raises(ConfigError, match="n_revisions"):
        load_config(critique.CritiqueConfig, None, BASE + ("principles_path=p.yaml", "n_revisions=0"))
    with pytest.raises(ConfigError, match="revision.temperature"):
        load_config(critique.CritiqueConfig, None, BASE + ("principles_path=p.yaml", "revision.temperature=-1"))


def test_draws_depend_on_row_and_round_only():
    a = critique.draw_principles(5, np.arange(40), rounds=3, seed=0)
    assert a.shape == (40, 3) and set(np.unique(a)) == set(range(5))
    np.testing.assert_array_equal(critique.draw_principles(5, np.arange(20, 40), rounds=3, seed=0), a[20:])
    assert not np.array_equal(critique.draw_principles(5, np.arange(40), rounds=3, seed=1), a)


def test_render_text_and_chat(tiny_llama):
    tok = common.load_tokenizer(str(tiny_llama))
    assert critique.render(tok, "Q:", [" a.", "\nCrit?", " c.", "\nRev:"]) == ("Q: a.\nCrit? c.\nRev:", True)
    msgs = [{"role": "user", "content": "Q"}]
    text, special = critique.render(tok, msgs, [" a", "Crit?"])
    want = tok.apply_chat_template(msgs + [{"role": "assistant", "content": " a"}, {"role": "user", "content": "Crit?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == want and not special
    assert critique.completion_of(msgs, "r") == [{"role": "assistant", "content": "r"}]
    assert critique.completion_of("Q:", "r") == "r"


def test_toy_constitution_synthetic_helper_rows():
    rows = cai_demo.helper_rows(3, [{"critique": "\nC?", "revision": "\nR:"}], seed=0)
    assert len(rows) == 6
    assert cai_demo.critique_text(" good bad sad.") == " bad, sad." and cai_demo.critique_text(" red.") == " none."
    assert cai_demo.revision_text(" good bad red.") == " good red." and cai_demo.revision_text(" bad.") == "."
    assert cai_demo.violation_rate([" good.", " awful red.", " kind.", "bad"]) == 0.5
    crit, rev = rows[0], rows[1]
    assert crit["prompt"].endswith("\nC?") and rev["prompt"] == crit["prompt"] + crit["completion"] + "\nR:"
    assert not cai_demo.unkind_words(rev["completion"])


@pytest.mark.slow
def test_critique_writes_revisions_that_train_sft(tiny_llama, task_data, tmp_path):
    out = tmp_path / "revised.jsonl"
    overrides = [f"model.path={tiny_llama}", f"data.path={task_data['prompts_train']}", "data.max_prompt_len=16",
                 f"output_path={out}", "principles_path=configs/constitutions/toy.yaml", "n_revisions=2",
                 "rollout.batch_size=12", "rollout.max_new_tokens=8", "revision.max_new_tokens=8",
                 "max_context_len=48"]
    res = critique.train(cli.load_trainer_config("critique", "configs/critique_tiny_cpu.yaml", overrides))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    traces = [json.loads(line) for line in (tmp_path / "revised.trace.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["prompt"] for line in task_data["prompts_train"].read_text().splitlines()]
    assert res["rows"] == len(rows) == len(traces) == 32  # every prompt, in file order (last batch padded)
    assert [r["prompt"] for r in rows] == prompts == [t["prompt"] for t in traces]
    drawn = critique.draw_principles(2, np.arange(32), rounds=2, seed=0)
    for row, trace, d in zip(rows, traces, drawn):
        assert [r["principle"] for r in trace["rounds"]] == list(d)
        assert row["completion"] == trace["rounds"][-1]["revision"]
        assert all(isinstance(r["critique"], str) for r in trace["rounds"])
    # the file is SFT data as it is
    tok = common.load_tokenizer(str(tiny_llama))
    splits = build_data(DataConfig(path=str(out), max_seq_len=32, max_prompt_len=16), tok, task="sft", batch_size=4)
    assert splits.stats.examples == 32
    code = cli.main(["sft", "configs/sft_tiny_cpu.yaml", f"model.path={tiny_llama}", f"data.path={out}",
                     "data.eval_path=null", "run.total_steps=2", "batch_size=4", "optim.warmup_steps=0",
                     "run.keep_best_metric=null", f"run.output_dir={tmp_path / 'sft'}", "run.tensorboard=false"])
    assert code == 0 and (tmp_path / "sft" / "model" / "config.json").exists()
