"""``rlhf-jax chat``: talk to a model in the terminal, through its tokenizer's chat template.

    rlhf-jax chat --model runs/demo/ppo/model [--system "You are terse."] [--temperature 0.7] [--max-new-tokens 256]

Each turn renders the whole conversation with the chat template (``add_generation_prompt``), prefills it into a
fresh KV cache in one jitted call, then samples one token per jitted decode step on that cache and prints the
text as it comes (:class:`ChatEngine`; the sampling is the trainers' ``rollout.sampling.sample_step``, greedy at
``--temperature 0``). The reply ends at an EOS token or after ``--max-new-tokens``; Ctrl-C cuts it short.
When the conversation outgrows the model's positions, its oldest turns are dropped (the system prompt stays).

Commands: ``/reset`` (forget the conversation), ``/system TEXT`` (set the system prompt; ``/system`` alone
clears it), ``/exit`` (or Ctrl-D). One device; prompt widths are bucketed to powers of two, so a long chat
compiles a few programs, not one per turn.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterator, Optional

HELP = "interactive multi-turn chat with a model's chat template (tokens stream as they are sampled)"
PROMPT = ">>> "
COMMANDS = "/reset clears the conversation, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model folder with a tokenizer that has a chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt (default: none)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default 256)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (default float32)")


def bucket(n: int, cap: int, smallest: int = 32) -> int:
    """The power of two ≥ ``n`` (at least ``smallest``), at most ``cap``."""
    b = smallest
    while b < n:
        b *= 2
    return max(min(b, cap), n)


class ChatEngine:
    """Token-by-token sampling from a prompt: one jitted prefill, then one jitted single-token step per token.

    ``stream(prompt_ids)`` yields each sampled id as soon as it is sampled (EOS included, then stops).
    """

    def __init__(self, model, params, *, eos_ids: tuple[int, ...], max_new_tokens: int, temperature: float,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0):
        import functools

        import jax

        self.model, self.params, self.eos_ids = model, params, tuple(int(e) for e in eos_ids)
        self.max_new_tokens = max_new_tokens
        self.context = int(model.config.max_position_embeddings)
        if max_new_tokens >= self.context:
            raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                             f"{self.context} positions")
        sample = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self._prefill = jax.jit(functools.partial(_prefill, model, sample=sample), static_argnames=("cache_len",))
        donate = (2,) if jax.default_backend() != "cpu" else ()  # the cache is updated in place (not on CPU)
        self._step = jax.jit(functools.partial(_step, model, sample=sample), donate_argnums=donate)
        self._key = jax.random.key(seed)
        self.turns = 0
        self.steps_run = 0  # decode steps so far (tests check that tokens come out one step at a time)

    @property
    def max_prompt_len(self) -> int:
        return self.context - self.max_new_tokens

    def stream(self, prompt_ids: list[int]) -> Iterator[int]:
        import jax
        import jax.numpy as jnp
        import numpy as np

        L = len(prompt_ids)
        if not 1 <= L <= self.max_prompt_len:
            raise ValueError(f"the prompt has {L} tokens; the model takes at most {self.max_prompt_len} "
                             f"next to --max-new-tokens {self.max_new_tokens}")
        P = bucket(L, self.max_prompt_len)
        ids = np.zeros((1, P), np.int32)
        mask = np.zeros((1, P), np.int32)
        ids[0, P - L:], mask[0, P - L:] = prompt_ids, 1  # left padding: the last prompt token is at slot P − 1
        key = jax.random.fold_in(self._key, self.turns)
        self.turns += 1
        token, cache, cache_mask = self._prefill(self.params, jnp.asarray(ids), jnp.asarray(mask),
                                                 jax.random.fold_in(key, 0), cache_len=P + self.max_new_tokens)
        for t in range(self.max_new_tokens):
            tok = int(token[0])
            yield tok
            if tok in self.eos_ids or t == self.max_new_tokens - 1:
                return
            # feed y_t at slot P + t, position L + t; sample y_{t+1}
            token, cache, cache_mask = self._step(self.params, token, cache, cache_mask, jnp.int32(P + t),
                                                  jnp.int32(L + t), jax.random.fold_in(key, t + 1))
            self.steps_run += 1


def _prefill(model, params, ids_1xP, mask_1xP, key, *, cache_len: int, sample: dict):
    import jax.numpy as jnp

    from rlhf_jax import models
    from rlhf_jax.rollout import sampling

    P = ids_1xP.shape[1]
    cache = models.init_cache(model.config, 1, cache_len)
    cache_mask = jnp.zeros((1, cache_len), jnp.int32).at[:, :P].set(mask_1xP)
    logits, cache = model.apply({"params": params}, ids_1xP, cache_mask, positions_BxS=models.default_positions(mask_1xP),
                                cache=cache, cache_index=jnp.int32(0), head_span=(P - 1, P))
    return sampling.sample_step(key, logits[:, -1], **sample).token_B, cache, cache_mask


def _step(model, params, token_1, cache, cache_mask, slot, position, key, *, sample: dict):
    import jax
    import jax.numpy as jnp

    from rlhf_jax.rollout import sampling

    cache_mask = jax.lax.dynamic_update_slice(cache_mask, jnp.ones((1, 1), jnp.int32), (0, slot))
    logits, cache = model.apply({"params": params}, token_1[:, None], cache_mask,
                                positions_BxS=jnp.reshape(position, (1, 1)), cache=cache, cache_index=slot)
    return sampling.sample_step(key, logits[:, -1], **sample).token_B, cache, cache_mask


def stream_text(tokenizer, token_ids: Iterator[int]) -> Iterator[str]:
    """The new text after each token (special tokens dropped; held back while a character is incomplete)."""
    ids: list[int] = []
    shown = ""
    for t in token_ids:
        ids.append(t)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(shown):
            continue  # an incomplete UTF-8 sequence, or a re-merge: wait for more tokens
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]


class Conversation:
    """The messages of a chat and their rendering with the chat template (oldest turns dropped to fit)."""

    def __init__(self, tokenizer, system: Optional[str] = None):
        self.tokenizer, self.system, self.turns = tokenizer, system, []

    def reset(self) -> None:
        self.turns = []

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt_ids(self, max_len: int) -> tuple[list[int], int]:
        """Token ids of the conversation + the generation prompt; drops the oldest turns until they fit in
        ``max_len`` tokens. Returns ``(ids, turns dropped)``; raises ValueError if the last message alone
        does not fit (and forgets it)."""
        dropped = 0
        while True:
            text = self.tokenizer.apply_chat_template(self.messages(), tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= max_len:
                return list(ids), dropped
            if len(self.turns) <= 1:
                self.turns = []
                raise ValueError(f"the message is {len(ids)} tokens with the template; at most {max_len} fit "
                                 "(shorten it, or lower --max-new-tokens)")
            self.turns = self.turns[2:] if self.turns[0]["role"] == "user" and len(self.turns) > 2 else self.turns[1:]
            dropped += 1


def check_chat_template(tokenizer, model_path: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{model_path}: the tokenizer has no chat template, which `rlhf-jax chat` needs "
                         "(use `rlhf-jax generate` for plain-text prompts)")


def main(args: argparse.Namespace, *, stdin=None, stdout=None) -> int:
    from rlhf_jax.train.run import load_tokenizer

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    tokenizer = load_tokenizer(args.model)
    check_chat_template(tokenizer, args.model)  # before the model loads: fail in a second

    import jax.numpy as jnp

    from rlhf_jax import models
    from rlhf_jax.online.sampler import eos_and_pad

    # No [out, in] decode copy here (`models.for_decoding`): one row per step reads each weight as fast in either
    # layout (~86M: 18 ms per token both ways, 2026-12-07).
    model, params = models.load_pretrained(args.model, dtype=jnp.dtype(args.dtype))
    eos, _ = eos_and_pad(model, tokenizer)
    engine = ChatEngine(model, params, eos_ids=eos, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    conv = Conversation(tokenizer, args.system)
    print(f"[rlhf_jax] chat with {args.model}: {COMMANDS}", file=sys.stderr, flush=True)

    def say(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    while True:
        say(PROMPT)
        line = stdin.readline()
        if not line:  # Ctrl-D
            say("\n")
            return 0
        text = line.rstrip("\n")
        cmd = text.strip()
        if not cmd:
            continue
        if cmd == "/exit":
            return 0
        if cmd == "/reset":
            conv.reset()
            say("[conversation cleared]\n")
            continue
        if cmd == "/system" or cmd.startswith("/system "):
            conv.system = cmd[len("/system"):].strip() or None
            say(f"[system prompt {'set' if conv.system else 'cleared'}]\n")
            continue
        if cmd.startswith("/"):
            say(f"[unknown command {cmd.split()[0]}: {COMMANDS}]\n")
            continue
        conv.turns.append({"role": "user", "content": text})
        try:
            ids, dropped = conv.prompt_ids(engine.max_prompt_len)
        except ValueError as e:
            say(f"[{e}]\n")
            continue
        if dropped:
            say(f"[dropped the {dropped} oldest turn(s) to fit the model's context]\n")
        reply = []
        try:
            for piece in stream_text(tokenizer, engine.stream(ids)):
                reply.append(piece)
                say(piece)
        except KeyboardInterrupt:
            say(" [interrupted]")
        say("\n")
        conv.turns.append({"role": "assistant", "content": "".join(reply)})
