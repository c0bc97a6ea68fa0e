"""End-of-run reporting from `metrics.jsonl`: PNG curves and a one-screen text summary."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

__all__ = ["PANELS", "best_mode", "curve_keys", "plot_curves", "read_metrics", "summary_table"]

_RESERVED = ("step", "split", "time")
# Metrics where larger is better; everything else (losses, KL, ...) is better when smaller.
_MAXIMIZE = ("acc", "reward", "score", "win", "margin", "return")
#: The panels `plot_curves` draws by default, in order, when logged: the losses, then what a user watches —
#: the score and gold score (train = the iteration's samples; eval = held-out greedy and sampled), the KL,
#: the response length — and the supervised/preference commands' held-out metrics.
PANELS = ("loss", "policy_loss", "value_loss", "score", "gold_score", "rm_score", "kl", "response_length",
          "eos_rate", "perplexity", "accuracy", "rewards_accuracy", "reward_margin", "rewards_margin")
#: Series drawn in another metric's panel: held-out sampled responses next to the greedy ones.
_SAME_PANEL = {"score": ("sampled_score",), "gold_score": ("sampled_gold_score",),
               "response_length": ("sampled_response_length",), "eos_rate": ("sampled_eos_rate",),
               "accuracy": ("sampled_accuracy",)}


def read_metrics(metrics_jsonl: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file.

    Raises:
      ValueError: a line that is not a JSON object with "step" and "split", naming file and line.
    """
    records = []
    with open(metrics_jsonl, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{metrics_jsonl}:{i}: not valid JSON: {e}") from None
            if not isinstance(rec, dict) or "step" not in rec or "split" not in rec:
                raise ValueError(f"{metrics_jsonl}:{i}: expected an object with 'step' and 'split'")
            records.append(rec)
    return records


def best_mode(name: str) -> str:
    """"max" for accuracy/reward-like names, else "min"."""
    lower = name.lower()
    return "max" if any(m in lower for m in _MAXIMIZE) else "min"


def _series(records: Sequence[Mapping[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in records if r["split"] == split and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def curve_keys(records: Sequence[Mapping[str, Any]], keys: Sequence[str] = PANELS) -> list[str]:
    """The panels of `keys` with at least one logged value (a panel also counts its `_SAME_PANEL` series)."""
    logged = {k for r in records for k in r if k not in _RESERVED}
    return [k for k in keys if k in logged or any(x in logged for x in _SAME_PANEL.get(k, ()))]


def plot_curves(
    metrics_jsonl: str | os.PathLike,
    out_png: str | os.PathLike,
    keys: Sequence[str] | None = None,
    *,
    title: str | None = None,
) -> pathlib.Path:
    """One panel per metric in `keys` (default `PANELS`; those that were logged), one line per split (an online
    run's `eval` split: the held-out greedy line, and its sampled line in the same panel); saved as PNG,
    at most 4 panels a row.

    Raises:
      ValueError: none of `keys` appears in the file.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_jsonl)
    keys = PANELS if keys is None else keys
    present = curve_keys(records, keys)
    if not present:
        logged = sorted({k for r in records for k in r if k not in _RESERVED})
        raise ValueError(f"none of {list(keys)} in {metrics_jsonl}; logged metrics: {logged}")
    splits = list(dict.fromkeys(r["split"] for r in records))
    cols = min(4, len(present))
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        for split in splits:
            sampled = _SAME_PANEL.get(key, ())
            for series in (key, *sampled):
                xs, ys = _series(records, split, series)
                if xs:
                    label = split if not sampled else f"{split} ({'sampled' if series != key else 'greedy'})"
                    label = split if split == "train" else label
                    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label,
                            linestyle="--" if series != key else "-")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = pathlib.Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summary_table(
    metrics_jsonl: str | os.PathLike,
    *,
    keys: Sequence[str] | None = None,
    outputs: Mapping[str, str | os.PathLike] | None = None,
    title: str = "run summary",
) -> str:
    """A one-screen text summary: steps, wall time, final and best value of each metric per split, and
    where outputs went (`outputs`: label → path). "Best" is max for accuracy/reward-like names (see
    `best_mode`), min otherwise; non-finite values are ignored for "best".
    """
    records = read_metrics(metrics_jsonl)
    lines = [f"== {title} =="]
    if records:
        steps = [int(r["step"]) for r in records]
        wall = max(float(r.get("time", 0.0)) for r in records)
        lines.append(f"steps {min(steps)}..{max(steps)}   wall time {wall:.1f} s   records {len(records)}")
    else:
        lines.append("no metrics logged")
    splits = list(dict.fromkeys(r["split"] for r in records))
    rows = []
    for split in splits:
        names = keys or list(dict.fromkeys(k for r in records if r["split"] == split for k in r if k not in _RESERVED))
        for key in names:
            xs, ys = _series(records, split, key)
            if not xs:
                continue
            mode = best_mode(key)
            finite = [(y, x) for x, y in zip(xs, ys) if math.isfinite(y)]
            if finite:
                by, bx = (max if mode == "max" else min)(finite, key=lambda t: t[0])
                best = f"{by:.4g} @{bx} ({mode})"
            else:
                best = "n/a"
            rows.append((f"{split}/{key}", f"{ys[-1]:.4g} @{xs[-1]}", best))
    if rows:
        w = [max(len(r[i]) for r in rows + [("metric", "final", "best")]) for i in range(3)]
        lines.append(f"{'metric':<{w[0]}}  {'final':<{w[1]}}  {'best':<{w[2]}}")
        lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}" for a, b, c in rows]
    for label, path in (outputs or {}).items():
        lines.append(f"{label}: {path}")
    return "\n".join(lines)
