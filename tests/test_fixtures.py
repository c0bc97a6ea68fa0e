"""Offline fixtures: tokenizer and tiny models load back with our loader and with transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import fixtures
from rlhf_jax.models import load_pretrained


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """`RLHF_JAX_CACHE` points at a fresh folder for this module: every build below is cached there (once per
    session, never under ~/.cache), through the environment variable rather than `cache_dir=`."""
    d = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_JAX_CACHE", str(d))
        yield d


@pytest.fixture(scope="module")
def tok(cache, tmp_path_factory):
    return fixtures.build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=1024, max_text_bytes=1_000_000), cache


def test_tokenizer_round_trip_and_specials(tok):
    tokenizer, _ = tok
    assert len(tokenizer) == 1024
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 4)
    assert tokenizer.convert_tokens_to_ids(list(fixtures.SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    text = "def main():\n    print('héllo, wörld')  # ünïcode ✓\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # BPE merges happened


def test_chat_template_renders_and_marks_assistant(tok):
    tokenizer, _ = tok
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    enc = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, amask = np.array(enc["input_ids"]), np.array(enc["assistant_masks"])
    assert tokenizer.decode(ids[amask == 1]) == "yo<|im_end|>"  # the assistant turn ends with EOS
    assert ids[amask == 1][-1] == tokenizer.eos_token_id


def test_tokenizer_is_cached_and_deterministic(tok, tmp_path):
    tokenizer, cache = tok
    assert fixtures.default_cache_dir() == cache
    again = fixtures.build_tokenizer(tmp_path, vocab_size=1024, max_text_bytes=1_000_000)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(list(cache.glob("tokenizer-*"))) == 1


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_tiny_config_is_valid_for_each_family(family):
    cfg = fixtures.tiny_config(family, vocab_size=300)
    assert cfg["vocab_size"] == 300 and cfg["pad_token_id"] == 0 and cfg["eos_token_id"] == 4
    json.dumps(cfg)


@pytest.mark.parametrize("family,head", [("llama3", "lm"), ("gpt2", "scalar")])
def test_tiny_model_loads_with_ours_and_transformers(tok, tmp_path, family, head):
    tokenizer, cache = tok
    path = fixtures.build_tiny_model(tmp_path / "m", family, tokenizer=tokenizer, head=head, hidden=32, layers=2)
    assert len(list(cache.glob(f"{family}-{head}-*"))) == 1  # built into $RLHF_JAX_CACHE
    assert (path / "tokenizer.json").is_file() and (path / "chat_template.jinja").is_file()
    model, params = load_pretrained(path, head=head)
    enc = tokenizer(["x = 1", "import os, sys"], padding=True, return_tensors="np")
    out = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(enc["input_ids"]),
                                          jnp.asarray(enc["attention_mask"])))
    assert np.isfinite(out).all()
    if head == "scalar":
        assert np.abs(out).max() > 0  # the fixture reward model is not constant
    again = fixtures.build_tiny_model(tmp_path / "m2", family, tokenizer=tokenizer, head=head, hidden=32,
                                      layers=2)  # a copy from the cache
    assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()

    torch = pytest.importorskip("torch")
    import transformers

    cls = transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForSequenceClassification
    hf = cls.from_pretrained(str(path)).eval()
    mask = enc["attention_mask"]
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)  # left padding: HF needs explicit positions to match ours
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.float().numpy()
    if head == "lm":
        assert np.abs(ref - out)[mask == 1].max() < 1e-4
    else:
        np.testing.assert_allclose(ref[:, 0], out[:, -1], atol=1e-4)  # left padding: last slot is real
