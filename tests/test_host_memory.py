"""The host allocator tunable (rlhf_jax/host_memory.py): when it is set, and that it takes effect."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from rlhf_jax import host_memory as hm

LINUX_GLIBC = sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc"


@pytest.mark.skipif(not LINUX_GLIBC, reason="the tunable is glibc's")
def test_env_is_set_appended_or_left_alone():
    assert hm.host_tunables_env({})["GLIBC_TUNABLES"] == hm.TUNABLE
    env = hm.host_tunables_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hm.TUNABLE and env["X"] == "1"
    assert hm.host_tunables_env({hm.ENV: "0"}) is None  # turned off
    assert hm.host_tunables_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice wins
    assert hm.host_tunables_env(env) is None  # already re-executed once: never loops


def _run(code: str, env: dict) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          check=True, timeout=300).stdout.strip()


@pytest.mark.skipif(not LINUX_GLIBC, reason="the tunable is glibc's")
def test_reexec_sets_the_tunable_once():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hm._DONE)}
    out = _run("""
        import os, sys
        from rlhf_jax.host_memory import reexec_with_host_tunables
        print("start", os.environ.get("GLIBC_TUNABLES"))
        reexec_with_host_tunables(["-c", "import os; print('child', os.environ['GLIBC_TUNABLES'])"])
        print("not reached when re-executed")
        """, env)
    assert out.splitlines() == ["start None", f"child {hm.TUNABLE}"]
    out = _run("from rlhf_jax.host_memory import reexec_with_host_tunables as r; r(['-c', 'print(1)']); print('kept')",
               {**env, hm.ENV: "0"})
    assert out == "kept"


@pytest.mark.skipif(not LINUX_GLIBC, reason="the tunable is glibc's")
def test_tunable_cuts_page_faults_of_repeated_xla_executions():
    """Each execution of a program with a large temporary buffer faults it in again; huge pages do it in 2 MiB
    steps. Counted with getrusage (minor faults of executions 2-4, after compile and first run)."""
    thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = thp.read_text() if thp.exists() else ""
    code = """
        import resource, jax, jax.numpy as jnp
        f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x))   # [4096, 4096] f32 temporaries: 64 MiB each
        x = jnp.ones((4096, 256), jnp.float32)
        f(x).block_until_ready()
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            f(x).block_until_ready()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
        """
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hm._DONE)}
    plain = int(_run(code, base))
    tuned = int(_run(code, {**base, "GLIBC_TUNABLES": hm.TUNABLE}))
    assert plain > 3 * 8192, plain  # at least half of a 64 MiB buffer per execution, in 4 KiB pages
    if "[never]" in mode or not mode:
        assert tuned > 0  # no transparent huge pages on this kernel: the tunable cannot help
    else:
        assert tuned * 4 < plain, (tuned, plain)
