"""The pairwise AI judge of Constitutional AI's RL stage (Bai et al. 2022, §4.1; ``rlhf-jax label`` with
``ranker: pairwise_judge``).

A judge LM sees a prompt, a principle and two responses as options (A) and (B), then the text that asks
for the answer (the template ends with e.g. ``"The better response is ("``). Its log-probs of the two
option tokens at that last position are read for every principle and for BOTH orders of the pair, and
:func:`rlhf_jax.ops.ai_feedback.pairwise_preference_prob` turns them into P(response 1 ≻ response 2).
All rows (pairs × principles × 2 orders) go through one jitted forward whose LM head runs on the last
position only.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as shd
from rlhf_jax.config import require
from rlhf_jax.data import pad_id_of
from rlhf_jax.ops.ai_feedback import pairwise_preference_prob
from rlhf_jax.online.texts import encode_texts, left_pad, shared_width

DEFAULT_TEMPLATE = ("{prompt}\nConsider the two responses below. {principle}\n(A){response_a}\n(B){response_b}\n"
                    "The better response is (")


@dataclasses.dataclass(frozen=True)
class PairwiseJudgeConfig:
    """A judge LM comparing two responses under each principle (fields of ``template``: ``{prompt}``,
    ``{principle}``, ``{response_a}``, ``{response_b}``)."""

    model_path: Optional[str] = None  # HF folder of the judge (null = the sampling model itself)
    template: str = DEFAULT_TEMPLATE
    principles: tuple[str, ...] = ("Which response is more helpful, honest and harmless?",)
    option_a: str = "A"  # each must be ONE token of the judge's tokenizer (as it follows the template)
    option_b: str = "B"
    max_len: int = 256  # judge inputs are left-truncated to this many tokens

    def __post_init__(self):
        for field in ("{response_a}", "{response_b}", "{principle}"):
            require(field in self.template, "pairwise_judge.template", f"must contain {field}")
        require(len(self.principles) >= 1, "pairwise_judge.principles", "needs at least one principle")
        require(self.option_a != self.option_b, "pairwise_judge.option_b", "must differ from option_a")
        require(self.max_len >= 2, "pairwise_judge.max_len", f"must be >= 2, got {self.max_len}")


def option_logprobs(logits_BxSxV: jax.Array, option_ids: jax.Array) -> jax.Array:
    """``log softmax(z_last)[options]``, ``[B, n_options]``, at the LAST column (inputs are left-padded)."""
    logp_BxV = jax.nn.log_softmax(logits_BxSxV[:, -1].astype(jnp.float32), axis=-1)
    return logp_BxV[:, option_ids]


def single_token(tokenizer, text: str, key: str) -> int:
    """The id of ``text`` as ONE token (a config error naming ``key`` otherwise)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    require(len(ids) == 1, key, f"{text!r} is {len(ids)} tokens of the judge tokenizer; use a single-token option")
    return int(ids[0])


def judge_program(model, option_ids: jax.Array):
    """Jitted ``(params, ids_BxS, mask_BxS) -> [B, n_options]`` option log-probs of left-padded judge inputs
    (the LM head on the last position only). Also what ``rlhf-jax plan`` compiles."""

    def fn(params, ids_BxS, mask_BxS):
        width = ids_BxS.shape[1]
        logits = model.apply({"params": params}, ids_BxS, mask_BxS, head_span=(width - 1, width))
        return option_logprobs(logits, option_ids)

    return jax.jit(fn)


class PairwiseJudge:
    """P(response 1 ≻ response 2) of this host's pairs, from a judge LM (``loaded``: a ``LoadedModel``)."""

    def __init__(self, loaded, cfg: PairwiseJudgeConfig):
        tok = loaded.tokenizer
        self.loaded, self.cfg, self.pad = loaded, cfg, pad_id_of(tok)
        ids = jnp.asarray([single_token(tok, cfg.option_a, "pairwise_judge.option_a"),
                           single_token(tok, cfg.option_b, "pairwise_judge.option_b")], jnp.int32)

        self._fn = judge_program(loaded.model, ids)

    def texts(self, prompts: list[str], first: list[str], second: list[str]) -> list[str]:
        """Judge inputs in the order [pair, principle, order]: order 0 shows ``first`` as (A), order 1 as (B)."""
        out = []
        for p, y1, y2 in zip(prompts, first, second):
            for principle in self.cfg.principles:
                for a, b in ((y1, y2), (y2, y1)):
                    out.append(self.cfg.template.format(prompt=p, principle=principle, response_a=a, response_b=b))
        return out

    def __call__(self, prompts: list[str], first: list[str], second: list[str], *, mesh) -> np.ndarray:
        """``prob_N`` (float32) for THIS host's N pairs; every host calls it with the same N."""
        k = len(self.cfg.principles)
        enc, _ = encode_texts(self.loaded.tokenizer, self.texts(prompts, first, second), max_len=self.cfg.max_len)
        ids, mask = left_pad(enc, width=shared_width(enc, max_len=self.cfg.max_len), pad_id=self.pad)
        ids, mask = shd.shard_batch((ids, mask), mesh)
        logp = shd.local_rows(self._fn(self.loaded.params, ids, mask)).astype(np.float32).reshape(len(prompts), k, 2, 2)
        prob = pairwise_preference_prob(*(jnp.asarray(logp[:, :, o, c]) for o in (0, 1) for c in (0, 1)))
        return np.asarray(prob, np.float32)
