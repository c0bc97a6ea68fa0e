"""rlhf_jax.runtime.xla.enable_compilation_cache: the persistent compilation cache is on by default, can be
relocated or turned off, and a second process loads the first one's programs (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from rlhf_jax.runtime import xla

PROGRAM = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from rlhf_jax.runtime import xla
    hits = []
    jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
    print("DIR", xla.enable_compilation_cache())
    print("MIN", jax.config.jax_persistent_cache_min_compile_time_secs)
    # store every program here: whether this one compiles in over a second depends on the machine's state
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    @jax.jit
    def f(x):
        for _ in range(20):
            x = jnp.tanh(x @ x.T) + jnp.sin(x)
        return x

    f(jnp.ones((32, 32))).block_until_ready()
    print("HITS", sum(e == "/jax/compilation_cache/cache_hits" for e in hits))
""")


def _run(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env}).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if line[:4] in ("DIR ", "HITS", "MIN "))


def test_default_folder_follows_xdg_cache_home():
    assert xla.default_cache_dir({"XDG_CACHE_HOME": "/c"}) == "/c/rlhf_jax/xla"
    assert xla.default_cache_dir({}).endswith(os.path.join(".cache", "rlhf_jax", "xla"))


def test_second_process_loads_the_first_ones_programs(tmp_path):
    env = {xla.CACHE_ENV: str(tmp_path / "cache")}
    first, second = _run(env), _run(env)
    assert first["DIR"] == second["DIR"] == str(tmp_path / "cache")
    assert float(first["MIN"]) == 1.0  # the default keeps sub-second compiles out of the cache
    assert first["HITS"] == "0" and int(second["HITS"]) >= 1, (first, second)
    assert any((tmp_path / "cache").iterdir())


def test_turned_off(tmp_path):
    result = _run({xla.CACHE_ENV: "0", "XDG_CACHE_HOME": str(tmp_path)})
    assert result["DIR"] == "None" and result["HITS"] == "0"
    assert not (tmp_path / "rlhf_jax").exists()
