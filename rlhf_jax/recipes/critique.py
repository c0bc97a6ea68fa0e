"""``rlhf-jax critique``: supervised Constitutional AI data (SL-CAI; Bai et al. 2022, §3).

For every prompt of ``data.path`` (one ordered pass): the policy (``model.path``) samples a response; then
``n_revisions`` rounds, each under a principle drawn (seeded, per prompt and round) from ``principles``
(a list of ``{critique, revision}`` request templates; inline, or a YAML file at ``principles_path``):

    critique  ~ helper( prompt + response + principle.critique )
    revision  ~ helper( prompt + response + principle.critique + critique + principle.revision )
    response ← revision

The helper is the policy itself, or a separate ``helper_model``. Plain-string prompts are continued as
text (the request templates carry their own separators, e.g. ``"\\nCritique request: ..."``); chat prompts
(message lists) become a conversation: response and critique as assistant turns, the requests as user
turns, rendered with the helper's chat template. Every round critiques the latest response in a fresh
context (prompt + response), so a round's input never holds earlier rounds' text. Contexts are
left-truncated to ``max_context_len`` tokens (counted). Each step is one call of the jitted sampler
(``online.sampler.Sampler``) over a whole batch of prompts.

Output (process 0, prompt order, every host's rows): ``output_path`` holds ``{"prompt", "completion"}``
rows (the final revisions; ``rlhf-jax sft`` reads them) and ``trace_path`` (default
``<output_path stem>.trace.jsonl``) the whole chain per prompt: the first response and, per round, the
principle's index, the critique and the revision. With several processes each host runs its slice of
every prompt batch; the file is the same as on one process.

Usage: ``rlhf-jax critique configs/critique_tiny_cpu.yaml model.path=runs/sft/model helper_model=runs/helper/model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from typing import Optional

import jax
import numpy as np
import yaml

from rlhf_jax import sharding as shd
from rlhf_jax.config import require
from rlhf_jax.data import BatchIterator, DataConfig, PromptBatch, build_data, pad_id_of
from rlhf_jax.online.config import RolloutConfig
from rlhf_jax.online.evaluation import fill_padding
from rlhf_jax.online.sampler import Sampler
from rlhf_jax.online.scoring import local_texts
from rlhf_jax.online.texts import text_prompt_batch
from rlhf_jax.runtime import distributed
from rlhf_jax.train import run as common


@dataclasses.dataclass(frozen=True)
class Principle:
    """One principle of the constitution: the critique request and the revision request appended to the
    conversation (text prompts: appended verbatim; chat prompts: user turns)."""

    critique: str
    revision: str

    def __post_init__(self):
        require(bool(self.critique) and bool(self.revision), "principles", "each principle needs a non-empty "
                "critique and revision request")


@dataclasses.dataclass(frozen=True)
class RevisionSampling:
    """How the helper samples critiques and revisions."""

    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 = greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class CritiqueConfig:
    """One critique → revision pass over a prompt file."""

    model: common.ModelLoadConfig  # the policy: samples the first responses
    data: DataConfig  # prompt rows (plain strings or message lists)
    output_path: str  # JSONL of prompt/completion rows (the final revisions)
    trace_path: Optional[str] = None  # JSONL of the whole chain; null = <output_path stem>.trace.jsonl
    principles: tuple[Principle, ...] = ()  # the constitution, inline ...
    principles_path: Optional[str] = None  # ... or a YAML file holding the list of {critique, revision}
    n_revisions: int = 1  # critique → revision rounds per prompt
    helper_model: Optional[str] = None  # HF folder that writes critiques and revisions; null = the policy
    rollout: RolloutConfig = RolloutConfig(batch_size=8)  # the first response; batch_size = prompts per call
    revision: RevisionSampling = RevisionSampling()  # the helper's critiques and revisions
    max_context_len: int = 96  # helper inputs keep their last this-many tokens
    seed: int = 0  # sampling keys and the principle draws
    mesh: shd.MeshConfig = shd.MeshConfig()

    def __post_init__(self):
        require(bool(self.output_path), "output_path", "must name the JSONL file to write")
        require(self.n_revisions >= 1, "n_revisions", f"must be >= 1, got {self.n_revisions}")
        require(bool(self.principles) != (self.principles_path is not None), "principles",
                "set exactly one of principles (an inline list) and principles_path (a YAML file)")
        require(self.max_context_len >= 2, "max_context_len", f"must be >= 2, got {self.max_context_len}")
        require(self.revision.max_new_tokens >= 1, "revision.max_new_tokens", "must be >= 1")
        require(self.revision.temperature >= 0, "revision.temperature", "must be >= 0 (0 = greedy)")

    @property
    def trace_file(self) -> pathlib.Path:
        out = pathlib.Path(self.output_path)
        return pathlib.Path(self.trace_path) if self.trace_path else out.with_name(out.name.split(".")[0] + ".trace.jsonl")


def load_principles(cfg: CritiqueConfig) -> tuple[Principle, ...]:
    """The inline principles, or the YAML list at ``principles_path`` (a list, or a mapping with a
    ``principles`` list), each entry ``{critique, revision}``; errors name the file and entry."""
    if cfg.principles:
        return cfg.principles
    path = pathlib.Path(cfg.principles_path)
    require(path.exists(), "principles_path", f"{path}: no such file")
    doc = yaml.safe_load(path.read_text())
    items = doc.get("principles") if isinstance(doc, dict) else doc
    require(isinstance(items, list) and items, "principles_path", f"{path}: expected a non-empty list of "
            "{critique, revision} mappings")
    out = []
    for i, item in enumerate(items):
        ok = isinstance(item, dict) and set(item) == {"critique", "revision"} and all(
            isinstance(v, str) and v for v in item.values())
        require(ok, "principles_path", f"{path}: entry {i}: expected {{critique: str, revision: str}}, got {item!r}")
        out.append(Principle(**item))
    return tuple(out)


def draw_principles(n_principles: int, row_index: np.ndarray, *, rounds: int, seed: int) -> np.ndarray:
    """``[B, rounds]`` principle indices: a pure function of (seed, dataset row, round), so the draws do
    not depend on the batch size or the number of processes."""
    return np.array([[np.random.default_rng([seed, int(i), r]).integers(n_principles) for r in range(rounds)]
                     for i in row_index], np.int64).reshape(len(row_index), rounds)


def render(tokenizer, prompt, turns: list[str]) -> tuple[str, bool]:
    """``(text, add special tokens)`` of a prompt followed by ``turns`` (response, request, critique, request,
    ...): concatenated for a string prompt; for a message list, assistant/user turns in the chat template."""
    if isinstance(prompt, str):
        return prompt + "".join(turns), True
    msgs = list(prompt) + [{"role": "assistant" if i % 2 == 0 else "user", "content": t} for i, t in enumerate(turns)]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), False


def completion_of(prompt, text: str):
    """The SFT completion for a prompt: the text, or one assistant turn for a message-list prompt."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def revision_rollout(cfg: CritiqueConfig, batch_size: int) -> RolloutConfig:
    """The helper's sampling settings (its critiques and revisions; also what ``rlhf-jax plan`` compiles)."""
    r = cfg.revision
    return RolloutConfig(batch_size=batch_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature or 1.0,
                         top_k=r.top_k, top_p=r.top_p)


class Reviser:
    """Critiques and revisions of this host's rows by the helper (one sampler call per step)."""

    def __init__(self, loaded, cfg: CritiqueConfig, mesh, batch_size: int):
        r = cfg.revision
        room = int(loaded.model.config.max_position_embeddings) - r.max_new_tokens
        require(cfg.max_context_len <= room, "max_context_len", f"{cfg.max_context_len} + revision.max_new_tokens="
                f"{r.max_new_tokens} exceeds the helper's {loaded.model.config.max_position_embeddings} positions")
        rollout = revision_rollout(cfg, batch_size)
        self.loaded, self.cfg, self.mesh = loaded, cfg, mesh
        self.sampler = Sampler(loaded.model, loaded.tokenizer, rollout, mesh)
        self.pad, self.truncated = pad_id_of(loaded.tokenizer), 0

    def __call__(self, prompts: list, turns: list[list[str]], key: jax.Array) -> list[str]:
        """One continuation per row of ``prompt + turns`` (this host's rows)."""
        rendered = [render(self.loaded.tokenizer, p, t) for p, t in zip(prompts, turns)]
        special = rendered[0][1]
        batch, cut = text_prompt_batch(self.loaded.tokenizer, [t for t, _ in rendered],
                                       max_len=self.cfg.max_context_len, pad_id=self.pad, special=special)
        self.truncated += cut
        ro = self.sampler(self.loaded.params, batch, key, temperature=self.cfg.revision.temperature)
        return local_texts(self.loaded.tokenizer, ro)[1]


def revise(reviser: Reviser, principles: tuple[Principle, ...], prompts: list, responses: list[str],
           drawn_BxR: np.ndarray, key: jax.Array) -> list[dict]:
    """The critique → revision rounds of this host's rows; returns one trace per row."""
    traces = [{"response": y, "rounds": []} for y in responses]
    current = list(responses)
    for r in range(drawn_BxR.shape[1]):
        chosen = [principles[int(k)] for k in drawn_BxR[:, r]]
        critiques = reviser(prompts, [[y, p.critique] for y, p in zip(current, chosen)], jax.random.fold_in(key, 2 * r))
        revisions = reviser(prompts, [[y, p.critique, c, p.revision] for y, p, c in zip(current, chosen, critiques)],
                            jax.random.fold_in(key, 2 * r + 1))
        for t, k, c, v in zip(traces, drawn_BxR[:, r], critiques, revisions):
            t["rounds"].append({"principle": int(k), "critique": c, "revision": v})
        current = revisions
    return traces


def train(cfg: CritiqueConfig) -> dict:
    """Write the revised prompt/completion rows and their traces; returns counts and paths."""
    principles = load_principles(cfg)
    mesh = common.make_mesh(cfg.mesh)
    actor = common.load_model(cfg.model, mesh=mesh, head="lm")
    tok = actor.tokenizer
    helper = actor if cfg.helper_model is None else common.load_model(
        dataclasses.replace(cfg.model, path=cfg.helper_model, tokenizer_path=None), mesh=mesh, head="lm")
    data_cfg = dataclasses.replace(cfg.data, format="prompt" if cfg.data.format == "auto" else cfg.data.format,
                                   buckets=(cfg.data.max_prompt_len,), shuffle=False, drop_last=False)
    host_bs = common.host_batch_size(cfg.rollout.batch_size, mesh)  # each host revises its slice of every batch
    data = build_data(data_cfg, tok, task="prompt", batch_size=host_bs).train.data
    it = BatchIterator(data, data_cfg, batch_size=host_bs, pad_id=pad_id_of(tok), shuffle=False, drop_last=False,
                       num_epochs=1, process_index=jax.process_index(), process_count=jax.process_count())
    sampler = Sampler(actor.model, tok, cfg.rollout, mesh)
    reviser = Reviser(helper, cfg, mesh, cfg.rollout.batch_size)
    out, trace_out = pathlib.Path(cfg.output_path), cfg.trace_file
    main = distributed.is_main_process()
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
        trace_out.parent.mkdir(parents=True, exist_ok=True)
    key, rows = jax.random.key(cfg.seed), 0
    with (open(out, "w") if main else contextlib.nullcontext()) as f, \
            (open(trace_out, "w") if main else contextlib.nullcontext()) as g:
        for n in range(it.batches_per_epoch):
            batch, real = _host_batch(it.batch(0, n))
            key_n = jax.random.fold_in(key, n)
            _, responses = local_texts(tok, sampler(actor.params, batch, jax.random.fold_in(key_n, 0)))
            index = np.asarray(batch.index_B)
            prompts = data.rows.select([int(i) for i in index])[cfg.data.prompt_field]
            drawn = draw_principles(len(principles), index, rounds=cfg.n_revisions, seed=cfg.seed)
            traces = revise(reviser, principles, prompts, responses, drawn, jax.random.fold_in(key_n, 1))
            local = [({"prompt": prompts[b], "completion": completion_of(prompts[b], traces[b]["rounds"][-1]["revision"])},
                      {"prompt": prompts[b], **traces[b]}) for b in np.flatnonzero(real)]
            for host_rows in distributed.allgather_objects(local):  # prompt order: hosts hold consecutive slices
                for row, trace in host_rows:
                    rows += 1
                    if main:
                        f.write(json.dumps(row) + "\n")
                        g.write(json.dumps(trace) + "\n")
    truncated = int(sum(distributed.allgather_rows(np.array([reviser.truncated]))))
    if main:
        print(f"[rlhf_jax] critique: {rows} revised rows ({cfg.n_revisions} rounds, {len(principles)} principles; "
              f"{truncated} helper contexts cut to max_context_len={cfg.max_context_len}) -> {out} (trace: {trace_out})",
              flush=True)
    return {"rows": rows, "contexts_truncated": truncated, "output_dir": str(out.parent), "output_path": str(out),
            "trace_path": str(trace_out)}


def _host_batch(batch: PromptBatch) -> tuple[PromptBatch, np.ndarray]:
    """``(batch, real_B)``: padding rows (index −1) become copies of a real row (every host samples every
    batch; a host whose slice is all padding gets copies of a one-token prompt) and are dropped later."""
    idx = np.asarray(batch.index_B)
    if (idx >= 0).any():
        return fill_padding(batch)
    mask = np.zeros_like(batch.prompt_mask_BxP)
    mask[:, -1] = 1
    return PromptBatch(batch.prompt_ids_BxP, mask, np.zeros_like(idx)), np.zeros(len(idx), bool)
