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
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert hm.host_tunables_env(cpu)["GLIBC_TUNABLES"] == hm.TUNABLE + ":" + hm.HEAP_TUNABLES
    env = hm.host_tunables_env({**cpu, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=7", "X": "1"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=7:{hm.TUNABLE}:{hm.HEAP_TUNABLES}"
    assert env["X"] == "1"
    assert hm.host_tunables_env({**cpu, hm.ENV: "0"}) is None  # turned off
    for own in ("glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=4", "a=1:glibc.malloc.mmap_max=9"):
        assert hm.host_tunables_env({**cpu, "GLIBC_TUNABLES": own}) is None, own  # the user's choice wins
    assert hm.host_tunables_env(env) is None  # already re-executed once: never loops


def test_heap_tunables_only_without_an_accelerator(tmp_path, monkeypatch):
    monkeypatch.setattr(hm, "_ACCELERATOR_DEVICES", (str(tmp_path / "accel[0-9]*"),))
    assert hm.host_is_cpu_only({}) and hm.tunables_for({}) == hm.TUNABLE + ":" + hm.HEAP_TUNABLES
    (tmp_path / "accel0").touch()  # a device file as a TPU VM has it
    assert not hm.host_is_cpu_only({}) and hm.tunables_for({}) == hm.TUNABLE
    assert hm.host_is_cpu_only({"JAX_PLATFORMS": "cpu"})  # forced onto the host anyway


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
    assert out.splitlines() == ["start None", f"child {hm.tunables_for(env)}"]
    out = _run("from rlhf_jax.host_memory import reexec_with_host_tunables as r; r(['-c', 'print(1)']); print('kept')",
               {**env, hm.ENV: "0"})
    assert out == "kept"


@pytest.mark.skipif(not LINUX_GLIBC, reason="the tunable is glibc's")
def test_tunables_cut_page_faults_of_repeated_xla_executions():
    """Each execution of a program with large temporary buffers faults them in again (4 KiB pages); huge
    pages do it in 2 MiB steps, and the heap tunables keep the pages mapped so that later executions fault
    nothing. Counted with getrusage (minor faults of executions 2-4, after compile and first run)."""
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
    huge = int(_run(code, {**base, "GLIBC_TUNABLES": hm.TUNABLE}))
    heap = int(_run(code, {**base, "GLIBC_TUNABLES": hm.TUNABLE + ":" + hm.HEAP_TUNABLES}))
    assert plain > 3 * 8192, plain  # at least half of a 64 MiB buffer per execution, in 4 KiB pages
    if "[never]" in mode or not mode:
        assert huge > 0  # no transparent huge pages on this kernel: that tunable cannot help
    else:
        assert huge * 4 < plain, (huge, plain)
    assert heap * 100 < plain, (heap, huge, plain)  # the buffers stay mapped: (almost) nothing faults again
