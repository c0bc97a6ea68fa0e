"""`rlhf-jax generate`: every prompt (plain and chat) in order with its columns, the same greedy completions as
`rlhf-jax eval`, K samples, a progress bar only on a terminal."""

from __future__ import annotations

import io
import json
import pathlib
import sys

import pytest

from rlhf_jax import cli, fixtures
from rlhf_jax.online import evaluation as ev
from rlhf_jax.recipes import evaluate, generate

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # importlib mode: make the sibling helper importable
from _pty_helpers import PtyProcess  # noqa: E402

ROWS = [
    {"prompt": "def main(", "answer": "1"},
    {"prompt": [{"role": "user", "content": "Write a loop."}], "answer": "2"},
    {"prompt": "import os\nimport sys\n", "answer": "3"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = fixtures.build_tokenizer(root / "tok")
    return fixtures.build_tiny_model(root / "model", "llama", tokenizer=tok, max_positions=128)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_greedy_generate_equals_eval_and_keeps_columns(model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "sub" / "gen.jsonl"
    flags = ["--model", str(model_dir), "--data", str(prompts_file), "--batch-size", "2", "--max-new-tokens", "10",
             "--temperature", "0"]
    assert cli.main(["generate", *flags, "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "3 prompts x 1" in err and "%|" not in err  # stderr is not a terminal: no progress bar
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: r[k] for k in ("prompt", "answer")} for r in rows] == ROWS
    _, eval_rows = evaluate.run(cli._parser().parse_args(["eval", *flags]))
    assert [r["completions"] for r in rows] == [r["completions"] for r in eval_rows]
    assert all(len(r["completions"]) == 1 for r in rows)


def test_samples_per_prompt_seeded(model_dir, prompts_file, tmp_path):
    def run(seed, out):
        args = cli._parser().parse_args(["generate", "--model", str(model_dir), "--data", str(prompts_file),
                                         "--output", str(out), "--samples", "3", "--temperature", "1.0",
                                         "--top-p", "0.95", "--top-k", "50", "--max-new-tokens", "6",
                                         "--batch-size", "2", "--seed", str(seed)])
        return generate.run(args)

    a = run(0, tmp_path / "a.jsonl")
    assert len(a) == 3 and all(len(r["completions"]) == 3 for r in a)
    assert any(len(set(map(tuple, r["completion_ids"]))) > 1 for r in a)  # the K samples differ
    assert [json.loads(line)["completions"] for line in (tmp_path / "a.jsonl").read_text().splitlines()] == \
        [r["completions"] for r in a]
    assert run(0, tmp_path / "b.jsonl") == a  # same seed, same samples


def test_progress_bar_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = ev.progress_bar(total=4, enabled=True, stream=stream)
    bar.update(4)
    bar.close()
    assert "4/4" in stream.getvalue()
    pipe = io.StringIO()
    bar = ev.progress_bar(total=4, enabled=True, stream=pipe)
    bar.update(4)
    bar.close()
    assert pipe.getvalue() == ""


def test_progress_bar_on_a_pseudo_terminal(model_dir, prompts_file, tmp_path):
    out = tmp_path / "tty.jsonl"
    p = PtyProcess(["generate", "--model", str(model_dir), "--data", str(prompts_file), "--output", str(out),
                    "--batch-size", "2", "--max-new-tokens", "4"])
    try:
        assert p.wait(timeout=300) == 0, p.buffer
    finally:
        p.close()
    assert "3/3" in p.buffer and "prompt/s" in p.buffer and "%|" in p.buffer
    assert len(out.read_text().splitlines()) == 3


def test_missing_output_flag_is_a_usage_error(prompts_file):
    with pytest.raises(SystemExit) as e:
        cli._parser().parse_args(["generate", "--model", "m", "--data", str(prompts_file)])
    assert e.value.code == 2
