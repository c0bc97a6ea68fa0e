"""`rlhf-jax eval`: greedy ids equal transformers' `generate(do_sample=False)` for every fixture family; scores,
pass@k, gold, KL and the written files."""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import pytest

from rlhf_jax import cli, fixtures
from rlhf_jax.online import evaluation as ev
from rlhf_jax.recipes import evaluate

MAX_NEW = 12
PROMPTS = [
    {"prompt": "def main(", "parity": 0},
    {"prompt": "import os\nimport sys\n\nclass Reader:\n    def __init__(self, path):", "parity": 1},
    {"prompt": [{"role": "system", "content": "Answer in code."},
                {"role": "user", "content": "Write a function that returns 2."}], "parity": 0},
    {"prompt": "return", "parity": 1},
    {"prompt": "for i in range(10):\n    ", "parity": 0},
]

REWARD_FILE = '''
def parity(prompts, responses, parity):
    return [1.0 if len(r) % 2 == p else 0.0 for r, p in zip(responses, parity)]

def length(prompts, responses):
    return [len(r) / 10.0 for r in responses]
'''


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("tok")
    fixtures.build_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return path


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    path.write_text(REWARD_FILE)
    return path


def _model(tmp_path_factory, tokenizer_dir, family: str, *, head: str = "lm", seed: int = 0) -> pathlib.Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return fixtures.build_tiny_model(tmp_path_factory.mktemp(f"{family}-{head}-{seed}"), family, tokenizer=tok,
                                     head=head, seed=seed, max_positions=256)


def _args(argv: list[str]) -> argparse.Namespace:
    return cli._parser().parse_args(["eval", *argv])


def _perturbed(src: pathlib.Path, dst: pathlib.Path, *, scale: float = 0.3) -> pathlib.Path:
    """The fixture's weights + N(0, scale²) noise: the tiny random models (init std 0.02) just repeat the last
    prompt token under greedy decoding when their head is tied; perturbed, they produce varied text."""
    import jax

    from rlhf_jax import models
    from rlhf_jax.train.run import load_tokenizer

    model, params = models.load_pretrained(src)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    models.save_pretrained(dst, model, jax.tree.unflatten(treedef, leaves), tokenizer=load_tokenizer(str(src)))
    return dst


def _hf_greedy(hf, torch, prompt_ids: list[int], eos: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                          dtype=torch.long), do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos,
                          pad_token_id=fixtures.PAD_ID)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_greedy_ids_equal_transformers_generate(family, layout, tmp_path_factory, tokenizer_dir, prompts_file,
                                                monkeypatch):
    """Both weight layouts the command may decode from (`models.for_decoding`: the tiny fixtures stay
    ``in_out`` by default; ``out_in`` is the copy larger models get on CPU), forced by its env switch."""
    monkeypatch.setenv("RLHF_JAX_DECODE_LAYOUT", layout)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model_dir = _perturbed(_model(tmp_path_factory, tokenizer_dir, family), tmp_path_factory.mktemp(family))
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    prompt_ids = [tok(p)["input_ids"] if isinstance(p, str) else
                  tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"] for p in (r["prompt"] for r in PROMPTS)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # A second EOS id: a token the model emits mid-response to the first prompt, so some rows stop early
    # (EOS kept, nothing after it) and others run to --max-new-tokens.
    eos = [fixtures.EOS_ID, _hf_greedy(hf, torch, prompt_ids[0], [fixtures.EOS_ID])[MAX_NEW // 2]]
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # batch 2 over 5 prompts: left padding within a batch, and a last batch with a padding row
    _, rows = evaluate.run(_args(["--model", str(model_dir), "--data", str(prompts_file), "--batch-size", "2",
                                  "--max-new-tokens", str(MAX_NEW)]))
    assert len(rows) == len(PROMPTS)
    lengths = []
    for src, ids, row in zip(PROMPTS, prompt_ids, rows):
        assert row["prompt"] == src["prompt"] and row["prompt_ids"] == list(ids)
        hf_ids = _hf_greedy(hf, torch, ids, eos)
        assert row["completion_ids"] == [hf_ids], f"{family}: prompt {src['prompt']!r}"
        assert row["completions"] == [tok.decode(hf_ids, skip_special_tokens=True)]
        lengths.append(len(hf_ids))
    assert min(lengths) <= MAX_NEW // 2 + 1 and max(lengths) == MAX_NEW, lengths  # both ways of ending occur
    assert len({t for r in rows for t in r["completion_ids"][0]}) > 10  # not a repeated token


def test_eval_scores_gold_kl_and_files(tmp_path_factory, tmp_path, tokenizer_dir, prompts_file, reward_file,
                                       capsys):
    model = _model(tmp_path_factory, tokenizer_dir, "llama")
    ref = _model(tmp_path_factory, tokenizer_dir, "llama", seed=1)
    rm = _model(tmp_path_factory, tokenizer_dir, "llama", head="scalar", seed=2)
    out = tmp_path / "out" / "eval.jsonl"
    rc = cli.main(["eval", "--model", str(model), "--data", str(prompts_file), "--batch-size", "2",
                   "--max-new-tokens", "8", "--samples", "4", "--temperature", "1.0", "--seed", "3",
                   "--reward", f"{reward_file}:parity", "--gold", f"{reward_file}:length",
                   "--ref", str(ref), "--output", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout)
    assert json.loads((tmp_path / "out" / "eval.summary.json").read_text()) == summary
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in PROMPTS]
    assert all(len(r["completions"]) == len(r["scores"]) == len(r["gold"]) == len(r["kl"]) == 4 for r in rows)
    assert "completion_ids" not in rows[0]
    # the scores are the reward function of the written completions with the file's extra column
    for src, r in zip(PROMPTS, rows):
        assert r["scores"] == [1.0 if len(c) % 2 == src["parity"] else 0.0 for c in r["completions"]]
        assert r["gold"] == pytest.approx([len(c) / 10.0 for c in r["completions"]])
    s = np.array([r["scores"] for r in rows])
    assert summary["prompts"] == 5 and summary["samples_per_prompt"] == 4 and not summary["greedy"]
    assert summary["reward_mean"] == pytest.approx(s.mean()) and summary["accuracy"] == pytest.approx(s.mean())
    assert summary["mean@4"] == pytest.approx(s.mean()) and summary["best@4"] == pytest.approx(s.max(1).mean())
    assert summary["pass@1"] == pytest.approx(s.mean())
    assert summary["pass@4"] == pytest.approx(s.max(1).mean())
    assert set(summary) >= {"pass@2", "gold_score", "response_length", "eos_rate", "kl", "kl_std"}
    assert summary["gold_score"] == pytest.approx(np.mean([r["gold"] for r in rows]))
    assert summary["kl"] == pytest.approx(np.mean([r["kl"] for r in rows]), rel=1e-5)
    assert 0 < summary["response_length"] <= 8 and 0 <= summary["eos_rate"] <= 1
    assert summary["kl_temperature"] == 1.0

    # reward model only, greedy, reference = the model itself: the KL is 0
    summary, rows = evaluate.run(_args(["--model", str(model), "--data", str(prompts_file), "--batch-size", "2",
                                        "--max-new-tokens", "8", "--reward-model", str(rm), "--ref", str(model)]))
    assert summary["greedy"] and summary["reward_model_normalized"] is False
    assert summary["rm_score_mean"] == pytest.approx(summary["reward_mean"])
    assert "accuracy" not in summary and "pass@1" not in summary
    assert abs(summary["kl"]) < 1e-4 and all(abs(k) < 1e-4 for r in rows for k in r["kl"])


def test_pass_at_k():
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    assert ev.pass_at(correct, 1) == pytest.approx((0.25 + 0 + 1) / 3)
    assert ev.pass_at(correct, 4) == pytest.approx(2 / 3)
    assert ev.pass_at(correct, 2) == pytest.approx((0.5 + 0 + 1) / 3)  # 1 - C(3,2)/C(4,2) = 1/2
    assert ev.pass_ks(8) == [1, 2, 4, 8] and ev.pass_ks(6) == [1, 2, 4, 6] and ev.pass_ks(1) == [1]


def test_flag_errors_are_one_line(capsys, prompts_file):
    rc = cli.main(["eval", "--model", "nope", "--data", str(prompts_file), "--samples", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--temperature" in err
    rc = cli.main(["eval", "--model", "nope", "--data", str(prompts_file), "--reward", "no_such_module:f"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no_such_module" in err
