"""Shared benchmark helpers: timing (warmup + median), peak RSS, one-JSON-line output, memory bandwidth,
and the offline Llama-style models (tiny and ~100M) written once with our `save_pretrained` so that the
same weights load into both our Flax model and `transformers` PyTorch.

Benchmarks print a human-readable table and then exactly one line `BENCH_JSON {...}` (parse the part
after the prefix).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

JSON_PREFIX = "BENCH_JSON "

#: Llama-style sizes (HF config fields). "tiny" matches the test fixtures' width; "small" is ~100M.
LLAMA_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=688, vocab_size=8192),
    "small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=2048, vocab_size=16384),
}


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock and process-CPU seconds of the measured iterations (after warmup). CPU time (all threads)
    is less sensitive than wall time to other jobs on a shared machine."""

    times_s: tuple[float, ...]
    cpu_times_s: tuple[float, ...] = ()

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_times_s)


def time_call(fn: Callable[[], Any], *, warmup: int, iters: int) -> Timing:
    """Run `fn` `warmup` times untimed, then `iters` times timed. `fn` must block until its result is ready."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"time_call: need iters >= 1 and warmup >= 0, got iters={iters} warmup={warmup}")
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return Timing(tuple(times), tuple(cpu))


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux `/proc/self/clear_refs` 5). False if unsupported."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size since the last `reset_peak_rss` (VmHWM), else since process start."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def emit_json(record: dict[str, Any]) -> None:
    """Print one machine-readable line: `BENCH_JSON {...}`."""
    print(JSON_PREFIX + json.dumps(record, sort_keys=True, default=float), flush=True)


def parse_json_line(text: str) -> dict[str, Any]:
    """The last `BENCH_JSON` record in a benchmark's stdout."""
    lines = [ln for ln in text.splitlines() if ln.startswith(JSON_PREFIX)]
    if not lines:
        raise ValueError("no BENCH_JSON line in benchmark output")
    return json.loads(lines[-1][len(JSON_PREFIX):])


def print_table(rows: list[tuple[str, str]], *, title: str) -> None:
    """Two-column aligned table."""
    width = max(len(k) for k, _ in rows)
    print(f"\n== {title} ==")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def machine_info() -> dict[str, Any]:
    """CPU count, load average and library versions (for the JSON record)."""
    import jax

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def memory_bandwidth_gbs(*, nbytes: int = 256 * 2**20, iters: int = 5) -> dict[str, float]:
    """Measured memory bandwidth (GB/s) of a large float32 array: copy (read + write bytes counted)
    through XLA (`x * 1`, not elided), and read-only (`sum(x)`). Median of `iters`."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * jnp.float32(1.0000001))
    read = jax.jit(lambda a: jnp.sum(a))
    t_copy = time_call(lambda: copy(x).block_until_ready(), warmup=1, iters=iters).median_s
    t_read = time_call(lambda: read(x).block_until_ready(), warmup=1, iters=iters).median_s
    return {"copy_gbs": 2 * nbytes / t_copy / 1e9, "read_gbs": nbytes / t_read / 1e9}


def llama_hf_config(size: str, *, max_position_embeddings: int = 2048) -> dict[str, Any]:
    """HF `config.json` dict of a Llama-style model of `LLAMA_SIZES[size]` (f32, untied head)."""
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(LLAMA_SIZES)}")
    s = LLAMA_SIZES[size]
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], **s,
        "head_dim": s["hidden_size"] // s["num_attention_heads"],
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_theta": 10000.0, "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
    }


def build_llama(directory: str | os.PathLike, size: str, *, seed: int = 0) -> pathlib.Path:
    """Write a random-weight Llama-style model of `size` to `directory` with our `save_pretrained`
    (safetensors + config.json, loadable by both `rlhf_jax.models.load_pretrained` and
    `transformers.LlamaForCausalLM.from_pretrained`). Idempotent: reuses an existing directory."""
    import jax

    from rlhf_jax import models

    directory = pathlib.Path(directory)
    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = models.ModelConfig.from_hf(llama_hf_config(size))
    model = models.Transformer(config, head="lm")
    params = models.init_params(model, jax.random.key(seed))
    models.save_pretrained(directory, model, params)
    return directory


def param_count(params: Any) -> int:
    """Number of scalars in a params pytree."""
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def param_bytes(params: Any) -> int:
    """Bytes of a params pytree."""
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def matmul_gflops(n: int = 2048, iters: int = 5) -> float:
    """This CPU's float32 matmul rate through XLA (median of ``iters`` jitted ``n``³ products), GFLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    t = time_call(lambda: f(a, a).block_until_ready(), warmup=1, iters=iters).median_s
    return 2 * n**3 / t / 1e9


def llama_matmul_params(model_dir: str | os.PathLike) -> dict[str, int]:
    """Matmul parameters of a Llama-style HF folder: ``body`` (attention + MLP of all layers), ``head``
    (the LM head, V·D) and the shapes the attention FLOPs need (layers, heads, head_dim)."""
    c = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    d, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    hd = c.get("head_dim") or d // heads
    kv = c.get("num_key_value_heads") or heads
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * c["intermediate_size"]
    return {"body": layers * per_layer, "head": c["vocab_size"] * d, "layers": layers, "heads": heads, "head_dim": hd}
