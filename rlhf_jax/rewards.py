"""Python reward functions for online RL: loading, batched calls, weighted sums, score post-processing.

A reward function has the signature (the same as the demo task's ``gold_score`` and close to TRL's)::

    def fn(prompts: list[str], responses: list[str], **columns) -> list[float | None]

It is called once per batch on host strings (decoded prompts and responses) plus any extra dataset
columns of those rows (e.g. ``answer`` for GSM8K), each passed as a list aligned with ``prompts``.
``None`` marks "no opinion" for a row (as in TRL); the weighted sum skips it.

Functions are named in configs as ``"package.module:function"`` (importable) or
``"path/to/file.py:function"`` (loaded from a file). The score post-processing helpers
(:func:`clip_scores`, :func:`normalize_scores`, :func:`no_eos_penalty`) are pure ``jax.numpy`` and run
inside or outside ``jit``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

RewardFn = Callable[..., Sequence[float | None]]


def load_function(spec: str) -> RewardFn:
    """Import ``"package.module:function"`` or ``"path/to/file.py:function"`` and return the callable.

    Raises:
      ValueError: malformed spec, missing module/file or attribute, or an attribute that is not callable.
    """
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise ValueError(f"reward function {spec!r}: expected 'package.module:function' or 'file.py:function'")
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"reward function {spec!r}: expected 'package.module:function' or 'file.py:function'")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise ValueError(f"reward function {spec!r}: file {path} does not exist")
        mod_id = f"_rlhf_jax_reward_{abs(hash(path))}"
        module = sys.modules.get(mod_id)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(mod_id, path)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
            sys.modules[mod_id] = module
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r}: {e}") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {attr!r} is not callable")
    return fn


def _accepts_kwargs(fn: RewardFn) -> tuple[bool, frozenset[str]]:
    """Whether ``fn`` takes ``**kwargs``, and the names of the keyword parameters it does take."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return True, frozenset()
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    names = frozenset(
        p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    return var_kw, names


class RewardFunctionError(ValueError):
    """A reward function raised or returned something that is not one finite score (or None) per row.
    The message names the function and the first bad row; the host loop adds the iteration."""


def _row(prompts: Sequence[str], i: int) -> str:
    text = str(prompts[i])
    return f"row {i} (prompt {text[:60] + '...' if len(text) > 60 else text!r})" if text else f"row {i}"


def _first_raising_row(fn: RewardFn, prompts, responses, kwargs) -> int | None:
    """The first row on which ``fn`` raises when called one row at a time (only after a batch call raised)."""
    for i in range(len(prompts)):
        try:
            fn([prompts[i]], [responses[i]], **{k: [v[i]] for k, v in kwargs.items()})
        except Exception:  # noqa: BLE001 - only locating the row
            return i
    return None


def call_reward_fn(
    fn: RewardFn,
    prompts: Sequence[str],
    responses: Sequence[str],
    columns: Mapping[str, Sequence] | None = None,
    *,
    name: str = "reward",
) -> np.ndarray:
    """Call one reward function on a batch; returns float64 ``[B]`` with NaN where it returned ``None``.

    Extra ``columns`` are passed as keyword lists; a function without ``**kwargs`` receives only the
    columns it names. Raises :class:`RewardFunctionError` (a ``ValueError``) naming the function and the
    first bad row when the function raises, returns something that is not a list (a bare float), a list of
    the wrong length, or a value that is not a finite number or ``None`` (NaN, ±inf, a string such as
    ``'0.5'``: strings are never coerced).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{name}: {len(prompts)} prompts but {len(responses)} responses")
    columns = dict(columns or {})
    for key, col in columns.items():
        if len(col) != len(prompts):
            raise ValueError(f"{name}: column {key!r} has {len(col)} rows, expected {len(prompts)}")
    var_kw, names = _accepts_kwargs(fn)
    kwargs = columns if var_kw else {k: v for k, v in columns.items() if k in names}
    prompts, responses = list(prompts), list(responses)
    try:
        out = fn(prompts, responses, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported as one line naming the function and the row
        bad = _first_raising_row(fn, prompts, responses, kwargs)
        where = f"on {_row(prompts, bad)}" if bad is not None else f"on a batch of {len(prompts)} rows"
        raise RewardFunctionError(f"{name} raised {type(e).__name__}: {e} {where}") from e
    if isinstance(out, np.ndarray) and out.ndim == 1:
        out = out.tolist()
    if isinstance(out, (str, bytes, Mapping)) or not (hasattr(out, "__len__") and hasattr(out, "__iter__")) \
            or getattr(out, "ndim", 1) != 1:
        raise RewardFunctionError(f"{name}: returned {type(out).__name__} {str(out)[:40]!r}; expected a list of one "
                                  f"score (float or None) per row, {len(prompts)} here")
    if len(out) != len(prompts):
        raise RewardFunctionError(f"{name}: returned {len(out)} scores for a batch of {len(prompts)}")
    values = np.empty(len(out), np.float64)
    for i, v in enumerate(out):
        if v is None:
            values[i] = np.nan
            continue
        try:
            if isinstance(v, (str, bytes, np.str_)):  # '0.5' is a bug in the function, not a score
                raise TypeError
            values[i] = float(v)
        except (TypeError, ValueError):
            raise RewardFunctionError(f"{name}: {_row(prompts, i)}: score {v!r} ({type(v).__name__}) is not a "
                                      "number or None") from None
        if math.isnan(values[i]):
            raise RewardFunctionError(f"{name}: {_row(prompts, i)}: score is NaN (return None for 'no score')")
        if math.isinf(values[i]):
            raise RewardFunctionError(f"{name}: {_row(prompts, i)}: score is {values[i]} (scores must be finite)")
    return values


@dataclass(frozen=True)
class WeightedRewards:
    """A weighted sum of Python reward functions: :math:`r = \\sum_i w_i f_i` (rows where ``f_i`` is None
    skip term i, as TRL's ``nansum``; a row with no score at all raises).

    Attributes:
      fns: the callables.
      weights: one float per function.
      names: one label per function (used in metrics as ``reward/<name>``).
    """

    fns: tuple[RewardFn, ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        if not (len(self.fns) == len(self.weights) == len(self.names)):
            raise ValueError(
                f"WeightedRewards: {len(self.fns)} functions, {len(self.weights)} weights, {len(self.names)} names"
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"WeightedRewards: duplicate names {self.names}")

    @classmethod
    def from_specs(cls, specs: Sequence[str], weights: Sequence[float] | None = None) -> WeightedRewards:
        """Load ``"module:function"`` specs; weights default to 1 each."""
        specs = list(specs)
        weights = [1.0] * len(specs) if weights is None or len(weights) == 0 else [float(w) for w in weights]
        if len(weights) != len(specs):
            raise ValueError(f"reward_weights has {len(weights)} entries but reward_fns has {len(specs)}")
        names, seen = [], {}
        for s in specs:
            base = s.rpartition(":")[2].rpartition(".")[2]
            seen[base] = seen.get(base, 0) + 1
            names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
        return cls(tuple(load_function(s) for s in specs), tuple(weights), tuple(names))

    def __len__(self) -> int:
        return len(self.fns)

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], columns: Mapping[str, Sequence] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Scores ``[B]`` (float32) and each function's raw values (NaN where it returned None)."""
        parts = {
            n: call_reward_fn(f, prompts, responses, columns, name=f"reward function {n!r}")
            for f, n in zip(self.fns, self.names)
        }
        if not parts:
            return np.zeros(len(prompts), np.float32), parts
        stack = np.stack([parts[n] * w for n, w in zip(self.names, self.weights)])
        none_rows = np.where(np.all(np.isnan(stack), axis=0))[0]
        if none_rows.size:
            raise ValueError(f"reward functions {self.names} all returned None for rows {none_rows.tolist()}")
        return np.nansum(stack, axis=0).astype(np.float32), parts


def clip_scores(score_B: jax.Array, *, clip: float | None) -> jax.Array:
    r"""Clip scores to :math:`[-c, c]` (OpenRLHF/TRL ``reward_clip_range``); ``None`` leaves them as is."""
    if clip is None:
        return score_B
    if clip <= 0:
        raise ValueError(f"clip_scores: clip must be > 0, got {clip}")
    return jnp.clip(score_B, -clip, clip)


def normalize_scores(score_B: jax.Array, *, mean: float, std: float, eps: float = 1e-8) -> jax.Array:
    r"""Standardise reward-model scores with statistics stored at RM training time.

    .. math:: \tilde s = (s - \mu_{RM}) / (\sigma_{RM} + \epsilon)

    Following Ziegler et al. 2019 (lm-human-preferences normalises the RM to zero mean and unit std on
    the policy's initial samples) and OpenRLHF ``--normalize_reward``.
    """
    if std < 0:
        raise ValueError(f"normalize_scores: std must be >= 0, got {std}")
    return (score_B - mean) / (std + eps)


def no_eos_penalty(score_B: jax.Array, has_eos_B: jax.Array, *, penalty: float | None) -> jax.Array:
    r"""Penalise responses that never emitted EOS (truncated at ``max_new_tokens``).

    .. math:: s_i \leftarrow s_i - p \cdot [\text{no EOS in } y_i]

    TRL's PPO ``missing_eos_penalty`` (subtracted) / lm-human-preferences' "truncate and penalise";
    ``None`` disables it. ``penalty`` is a positive amount.
    """
    if penalty is None:
        return score_B
    return score_B - jnp.where(has_eos_B, 0.0, penalty).astype(score_B.dtype)


# ------------------------------------------------------------------------------------ reward-model stats
REWARD_MEAN_KEY, REWARD_STD_KEY = "rlhf_jax_reward_mean", "rlhf_jax_reward_std"


def load_reward_stats(model_dir) -> tuple[float, float]:
    """(mean, std) of the train-set rewards stored in an exported reward model's config.json by ``rlhf-jax rm``."""
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    if REWARD_MEAN_KEY not in config:
        raise KeyError(f"{model_dir}/config.json has no {REWARD_MEAN_KEY}/std: not an rlhf_jax reward model export")
    return float(config[REWARD_MEAN_KEY]), float(config[REWARD_STD_KEY])
