"""`rlhf-jax chat`: tokens stream one decode step at a time with the sampler's greedy ids; a multi-turn session
with /system, /reset and /exit through a pseudo-terminal; one clean error line without a chat template."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import fixtures, models
from rlhf_jax.online.sampler import eos_and_pad
from rlhf_jax.recipes import chat
from rlhf_jax.rollout import generate
from rlhf_jax.train.run import load_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # importlib mode: make the sibling helper importable
from _pty_helpers import PtyProcess  # noqa: E402

MAX_NEW = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    """The fixture Llama + N(0, 0.3²) noise on every weight: at init (std 0.02) its replies barely depend on the
    conversation, so a test could not tell whether /reset or /system took effect."""
    root = tmp_path_factory.mktemp("chat")
    tok = fixtures.build_tokenizer(root / "tok")
    src = fixtures.build_tiny_model(root / "fixture", "llama", tokenizer=tok, max_positions=128)
    model, params = models.load_pretrained(src)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return models.save_pretrained(root / "model", model, jax.tree.unflatten(treedef, leaves), tokenizer=tok)


@pytest.fixture(scope="module")
def loaded(model_dir):
    tok = load_tokenizer(str(model_dir))
    model, params = models.load_pretrained(model_dir)
    return tok, model, params


def _engine(loaded, **kw):
    tok, model, params = loaded
    eos, _ = eos_and_pad(model, tok)
    return chat.ChatEngine(model, params, eos_ids=eos, **{"max_new_tokens": MAX_NEW, "temperature": 0.0, **kw})


def _reply(loaded, messages, *, max_new_tokens=MAX_NEW) -> str:
    tok = loaded[0]
    conv = chat.Conversation(tok)
    conv.turns = [m for m in messages if m["role"] != "system"]
    conv.system = next((m["content"] for m in messages if m["role"] == "system"), None)
    ids, _ = conv.prompt_ids(128 - max_new_tokens)
    return "".join(chat.stream_text(tok, _engine(loaded, max_new_tokens=max_new_tokens).stream(ids)))


def test_stream_is_step_by_step_and_equals_the_greedy_sampler(loaded):
    tok, model, params = loaded
    conv = chat.Conversation(tok, system="Be brief.")
    conv.turns = [{"role": "user", "content": "Write a function that returns 2."}]
    ids, dropped = conv.prompt_ids(100)
    assert dropped == 0
    engine = _engine(loaded, max_new_tokens=12)
    it = engine.stream(ids)
    first = next(it)
    assert engine.steps_run == 0  # the first token comes from the prefill, before any decode step
    got = [first, *it]
    assert engine.steps_run == len(got) - 1
    eos, pad = eos_and_pad(model, tok)
    ro = generate(model, params, jnp.asarray([ids], jnp.int32), jnp.ones((1, len(ids)), jnp.int32),
                  key=jax.random.key(0), max_new_tokens=12, temperature=0.0, eos_token_id=eos, pad_token_id=pad)
    expect = np.asarray(ro.response_ids_BxT)[0][: int(ro.lengths_B[0])].tolist()
    assert got == expect and len(set(got)) > 3


def test_sampling_is_seeded(loaded):
    conv = chat.Conversation(loaded[0])
    conv.turns = [{"role": "user", "content": "hello"}]
    ids, _ = conv.prompt_ids(100)
    a = list(_engine(loaded, temperature=1.0, top_k=20, top_p=0.9, seed=1).stream(ids))
    b = list(_engine(loaded, temperature=1.0, top_k=20, top_p=0.9, seed=1).stream(ids))
    assert a == b and 1 <= len(a) <= MAX_NEW


def test_stream_text_holds_back_incomplete_characters(loaded):
    tok = loaded[0]
    text = "héllo ✓ wörld — ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = list(chat.stream_text(tok, iter([*ids, fixtures.EOS_ID])))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces) and len(pieces) > 1


def test_conversation_drops_oldest_turns_to_fit(loaded):
    tok = loaded[0]
    conv = chat.Conversation(tok, system="sys")
    for i in range(4):
        conv.turns += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "answer " * 5}]
    conv.turns.append({"role": "user", "content": "last"})
    full, _ = conv.prompt_ids(10_000)
    ids, dropped = conv.prompt_ids(len(full) - 1)
    assert dropped == 1 and len(ids) < len(full) and conv.turns[0]["content"].startswith("question 1")
    assert conv.messages()[0] == {"role": "system", "content": "sys"}
    with pytest.raises(ValueError, match="at most 3 fit"):
        conv.prompt_ids(3)
    assert conv.turns == []


def test_session_through_a_pseudo_terminal(model_dir, loaded):
    r1 = _reply(loaded, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    r2 = _reply(loaded, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                         {"role": "assistant", "content": r1}, {"role": "user", "content": "and then?"}])
    r3 = _reply(loaded, [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "hi"}])
    assert len({r1, r2, r3}) == 3
    tty = lambda s: s.replace("\n", "\r\n")  # noqa: E731  (the terminal's output translation)
    p = PtyProcess(["chat", "--model", str(model_dir), "--temperature", "0", "--max-new-tokens", str(MAX_NEW),
                    "--system", "Be brief."])
    try:
        p.expect("/exit (or Ctrl-D) quits")
        p.expect(chat.PROMPT)
        p.send("hello")
        p.expect("hello\r\n")  # the terminal's echo
        assert p.expect(chat.PROMPT) == tty(r1 + "\n")
        p.send("and then?")
        p.expect("and then?\r\n")
        assert p.expect(chat.PROMPT) == tty(r2 + "\n")
        p.send("/reset")
        assert "[conversation cleared]" in p.expect(chat.PROMPT)
        p.send("/system")
        assert "[system prompt cleared]" in p.expect(chat.PROMPT)
        p.send("/system Answer in code.")
        assert "[system prompt set]" in p.expect(chat.PROMPT)
        p.send("/bogus")
        assert "[unknown command /bogus" in p.expect(chat.PROMPT)
        p.send("hi")
        p.expect("hi\r\n")
        assert p.expect(chat.PROMPT) == tty(r3 + "\n")
        p.send("/exit")
        assert p.wait() == 0
    finally:
        p.close()


def test_model_without_chat_template_is_one_error_line(model_dir, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    p = PtyProcess(["chat", "--model", str(plain)])
    try:
        assert p.wait(timeout=120) == 2
    finally:
        p.close()
    lines = [ln for ln in p.buffer.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlhf-jax chat: error:") and "no chat template" in lines[0]
