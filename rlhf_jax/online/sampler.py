"""Step 1 of an online iteration: prompts → responses.

* :func:`prompt_splits`: the training (and held-out) prompts at ONE static width (nothing recompiles).
* :class:`Sampler`: ``rollout.generate`` on the policy's current params, G samples per prompt in
  contiguous groups (:func:`repeat_prompts` order), the prompt prefilled once per group when the groups
  split evenly over the batch shards; the params resharded once per call to the inference layout
  (``rollout.param_axes``, the hybrid engine: no weight all-gather in the decode loop), and with
  ``rollout.weight_layout: out_in`` transposed to ``[out, in]`` in the same program.
* :func:`frozen_copy`: the reference (and reward model) as frozen copies in fresh buffers.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax import sharding as shd
from rlhf_jax.data import DataConfig, DataSplits, PromptBatch, build_data
from rlhf_jax.online.config import RolloutConfig
from rlhf_jax.rollout import generate, inference_layout, inference_rules, reshard_for_inference
from rlhf_jax.rollout.types import Rollout


def repeat_prompts(batch: PromptBatch, n: int) -> PromptBatch:
    """Each prompt row repeated ``n`` times in contiguous rows (``[B, ...]`` → ``[B·n, ...]``)."""
    if n < 1:
        raise ValueError(f"repeat_prompts: n must be >= 1, got {n}")
    return PromptBatch(*(np.repeat(np.asarray(x), n, axis=0) for x in batch))


def prompt_splits(data: DataConfig, tokenizer, host_bs: int) -> DataSplits:
    """This host's training prompts (``.train``) and held-out prompts (``.eval``: None without
    ``data.eval_path`` / ``data.eval_fraction``; one ordered pass, last batch padded), both at ONE static width
    ``data.max_prompt_len`` (nothing recompiles)."""
    cfg = dataclasses.replace(data, format="prompt" if data.format == "auto" else data.format,
                              buckets=(data.max_prompt_len,))
    return build_data(cfg, tokenizer, task="prompt", batch_size=host_bs, eval_batch_size=host_bs,
                      process_index=jax.process_index(), process_count=jax.process_count())


def frozen_copy(params, shardings, dtype: str):
    """A frozen copy in fresh buffers (never donated, never in an optimizer), floats cast to ``dtype``."""
    dt = jnp.dtype(dtype)
    cast = lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=shardings)(params)


def eos_and_pad(model, tokenizer) -> tuple[tuple[int, ...], int]:
    """EOS ids (model config, else tokenizer) and the pad id."""
    eos = tuple(np.atleast_1d(model.config.eos_token_id or tokenizer.eos_token_id).tolist())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return eos, int(pad)


def out_in(model, layout: str) -> bool:
    """``rollout.weight_layout`` resolved: "auto" is ``out_in`` for a full (not LoRA) actor where
    ``models.weight_layout.pays_off`` (XLA:CPU, ≥ 64 MiB of projection weights); the same answer on every
    process (it reads the model's shapes and the backend only)."""
    if layout != "auto":
        return layout == "out_in"
    from rlhf_jax.models import weight_layout

    shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
    return model.config.lora is None and model.config.weight_layout == "in_out" and weight_layout.pays_off(model, shapes)


class Sampler:
    """Sample responses from the policy (one compiled decode loop per prompt width and group size).

    Args:
      model: the policy's Flax module (LM head).
      tokenizer: its tokenizer (EOS and pad ids).
      rollout: the sampling settings.
      mesh: device mesh; prompt batches are this host's rows (``sharding.shard_batch``).
    """

    def __init__(self, model, tokenizer, rollout: RolloutConfig, mesh):
        self.model, self.rollout, self.mesh = model, rollout, mesh
        self.eos_ids, self.pad_id = eos_and_pad(model, tokenizer)
        same = "fsdp" in rollout.param_axes or mesh.shape["fsdp"] == 1  # inference layout = training layout
        rules = None if same else inference_rules(keep_axes=tuple(rollout.param_axes))
        # the model the decode loop runs: the actor, or its [out, in] copy (rollout.weight_layout)
        self.decode_model = models.out_in_model(model) if out_in(model, rollout.weight_layout) else model
        self.param_shardings = None
        if not same:
            self.param_shardings = inference_layout(self.decode_model, mesh, rules=rules)
        elif self.decode_model is not model:
            self.param_shardings = shd.param_shardings(self.decode_model, mesh)

    def __call__(self, params, batch: PromptBatch, key: jax.Array, *, temperature: Optional[float] = None,
                 repeats: int = 1) -> Rollout:
        """``repeats`` responses per prompt of this host's ``batch`` (rows in :func:`repeat_prompts` order).

        The prompt is prefilled once per group and its KV cache shared (``generate(prompt_repeats=)``)
        whenever the distinct prompts split evenly over the batch shards; otherwise the prompts are
        repeated on the host first. Both give the same rollout.
        """
        r = self.rollout
        shared = repeats > 1 and len(batch.prompt_ids_BxP) % shd.local_batch_divisor(self.mesh) == 0
        if repeats > 1 and not shared:
            batch = repeat_prompts(batch, repeats)
        b = shd.shard_batch(batch, self.mesh)
        if self.decode_model is not self.model:  # one program: transposed and laid out for sampling
            params = models.to_out_in(self.model, params, shardings=self.param_shardings)[1]
        elif self.param_shardings is not None:  # a copy for sampling; the training params stay as they are
            params = reshard_for_inference(params, self.param_shardings)
        with shd.mesh_context(self.mesh):
            ro = generate(self.decode_model, params, b.prompt_ids_BxP, b.prompt_mask_BxP, key=key,
                          max_new_tokens=r.max_new_tokens,
                          temperature=r.temperature if temperature is None else temperature,
                          top_k=r.top_k, top_p=r.top_p, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                          min_new_tokens=r.min_new_tokens, prompt_repeats=repeats if shared else 1,
                          param_shardings=self.param_shardings,
                          batch_sharding=None if self.param_shardings is None else shd.batch_sharding(self.mesh))
        return jax.block_until_ready(ro)
