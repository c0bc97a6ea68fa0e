"""Offline fixtures: a byte-level BPE tokenizer with a chat template, and random tiny models of each family.

Nothing here needs torch or the network. Builds are cached by content hash under `cache_dir`
(default `$RLHF_JAX_CACHE`, else `~/.cache/rlhf_jax`) and copied to the caller's `out_dir`.

Token ids of the special tokens are fixed: `<|pad|>`=0, `<|bos|>`=1, `<|eos|>`=2, `<|im_start|>`=3,
`<|im_end|>`=4. The tokenizer's EOS token is `<|im_end|>`, which closes every chat turn, so sampling stops
at the end of an assistant turn; `<|eos|>` stays available as a plain special token.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
import shutil
import sysconfig
import tempfile

PAD, BOS, EOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)  # ids 0..4
PAD_ID, BOS_ID, EOS_ID = 0, 1, 4  # EOS_ID is <|im_end|>

# ChatML-like (Qwen/OpenAI ChatML). `{% generation %}` marks assistant text so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` can mask the loss to assistant tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

FAMILIES = ("gpt2", "llama", "llama3", "mistral", "qwen2", "qwen3")
_FORMAT_VERSION = "1"  # bump when what a build writes changes, to invalidate caches


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("RLHF_JAX_CACHE", pathlib.Path.home() / ".cache" / "rlhf_jax"))


def corpus_files(max_bytes: int = 4_000_000) -> list[str]:
    """Deterministic offline text: the Python standard library's `*.py` sources (sorted), up to `max_bytes`."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)
                   if "site-packages" not in f and "/test" not in f and "__pycache__" not in f)
    out, total = [], 0
    for f in files:
        n = os.path.getsize(f)
        if total + n > max_bytes:
            break
        out.append(f)
        total += n
    if not out:
        raise FileNotFoundError(f"no *.py files found under the standard library at {stdlib}")
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _copy_cached(cache_entry: pathlib.Path, out_dir: pathlib.Path, build) -> None:
    """Builds into `cache_entry` once (atomically, via a temp dir + rename), then copies it to `out_dir`."""
    if not cache_entry.is_dir():
        cache_entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{cache_entry.name}.tmp-", dir=cache_entry.parent))
        try:
            build(tmp)
            try:
                tmp.rename(cache_entry)
            except OSError:  # another process won the race; use its copy
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(cache_entry, out_dir, dirs_exist_ok=True)


def _train_tokenizer(out_dir: pathlib.Path, vocab_size: int, files: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=IM_END,
                                     additional_special_tokens=[EOS, IM_START], padding_side="left",
                                     model_max_length=4096)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))


def build_tokenizer(out_dir, *, vocab_size: int = 4096, seed: int = 0, cache_dir=None, max_text_bytes=4_000_000):
    """Trains (or fetches from the cache) a byte-level BPE tokenizer and saves it to `out_dir`.

    Args:
      out_dir: where `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` are written.
      vocab_size: total vocabulary including the 5 special tokens.
      seed: part of the cache key; BPE training on a fixed sorted corpus is deterministic anyway.
      cache_dir: cache root (default `default_cache_dir()`).
      max_text_bytes: cap on the training text (stdlib `*.py`), for speed.

    Returns:
      The `PreTrainedTokenizerFast` loaded back from `out_dir` (left padding; pad/bos/eos set).
    """
    from transformers import AutoTokenizer

    files = corpus_files(max_text_bytes)
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode())
        h.update(pathlib.Path(f).read_bytes())
    key = _digest(["tokenizer", _FORMAT_VERSION, vocab_size, seed, h.hexdigest(), CHAT_TEMPLATE])
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _copy_cached(cache / f"tokenizer-{key}", pathlib.Path(out_dir),
                 lambda tmp: _train_tokenizer(tmp, vocab_size, files))
    return AutoTokenizer.from_pretrained(str(out_dir))


def tiny_config(family: str, *, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int | None = None, max_positions: int = 512,
                tie_word_embeddings: bool | None = None, pad_token_id: int = PAD_ID, bos_token_id: int = BOS_ID,
                eos_token_id: int = EOS_ID) -> dict:
    """A HF `config.json` dict of a tiny model of `family` (one of `FAMILIES`).

    Family defaults: gpt2 (MHA, tied, learned positions), llama (GQA, untied), llama3 (llama + llama3 rope
    scaling, theta 500000, tied), mistral (GQA, sliding_window = max_positions), qwen2 (qkv bias, tied),
    qwen3 (q/k norm, head_dim 2·hidden/heads, untied).
    """
    from rlhf_jax.models.config import ModelConfig

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; expected one of {FAMILIES}")
    gpt2 = family == "gpt2"
    model_type = "llama" if family == "llama3" else family
    tie = {"gpt2": True, "llama3": True, "qwen2": True}.get(family, False)
    hd = hidden // heads * (2 if family == "qwen3" else 1)
    config = ModelConfig(
        model_type=model_type, vocab_size=vocab_size, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=heads if gpt2 else kv_heads, head_dim=hd,
        intermediate_size=intermediate or (4 * hidden if gpt2 else 3 * hidden),
        max_position_embeddings=max_positions, norm_eps=1e-5 if gpt2 else 1e-6,
        activation="gelu_new" if gpt2 else "silu",
        rope_theta=500000.0 if family == "llama3" else 10000.0,
        rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                      ("original_max_position_embeddings", max(max_positions // 8, 1)),
                      ("rope_type", "llama3")) if family == "llama3" else None,
        qkv_bias=gpt2 or family == "qwen2", o_bias=gpt2, mlp_bias=gpt2, qk_norm=family == "qwen3",
        sliding_window=max_positions if family == "mistral" else None,
        tie_word_embeddings=tie if tie_word_embeddings is None else tie_word_embeddings,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    return config.to_hf()


def build_tiny_model(out_dir, family: str, *, tokenizer=None, head: str = "lm", seed: int = 0, cache_dir=None,
                     **overrides) -> pathlib.Path:
    """Writes a random tiny model (our `init_params` + `save_pretrained`) in HF format to `out_dir`.

    The vocabulary is `len(tokenizer)` (or `overrides["vocab_size"]`). With `head="scalar"` the score head
    is drawn from normal(0, initializer_range) (not zero) so the fixture reward model ranks texts.
    The tokenizer, if given, is saved alongside. Cached by a hash of the config, head, seed and tokenizer.
    """
    import jax

    from rlhf_jax.models import ModelConfig, Transformer, init_params, save_pretrained

    if tokenizer is None and "vocab_size" not in overrides:
        raise ValueError("build_tiny_model needs a tokenizer or vocab_size=...")
    vocab_size = overrides.pop("vocab_size", None) or len(tokenizer)
    hf_config = tiny_config(family, vocab_size=vocab_size, **overrides)
    tok_key = None
    if tokenizer is not None:
        tok_key = _digest([tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template])
    key = _digest(["model", _FORMAT_VERSION, hf_config, head, seed, tok_key])

    def build(tmp: pathlib.Path) -> None:
        model = Transformer(ModelConfig.from_hf(hf_config), head=head)
        k_init, k_score = jax.random.split(jax.random.key(seed))
        params = init_params(model, k_init)
        if head == "scalar":
            std = model.config.initializer_range
            params["score"] = std * jax.random.normal(k_score, params["score"].shape, params["score"].dtype)
        save_pretrained(tmp / "model", model, params, tokenizer=tokenizer)
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()

    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _copy_cached(cache / f"{family}-{head}-{key}", pathlib.Path(out_dir), build)
    return pathlib.Path(out_dir)
