"""Run a command on a pseudo-terminal (stdlib `pty`): read what it prints, type lines, wait for it to exit."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time


class PtyProcess:
    """``python -m rlhf_jax ARGS`` with stdin, stdout and stderr on one pseudo-terminal."""

    def __init__(self, args: list[str], *, cwd=None, env=None):
        self.master, slave = pty.openpty()
        full_env = {**os.environ, "RLHF_JAX_HOST_TUNABLES": "0", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "rlhf_jax", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=cwd, env=full_env, start_new_session=True, close_fds=True)
        os.close(slave)
        self.buffer = ""

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 4096)
        except OSError:  # the child closed the terminal
            return False
        self.buffer += data.decode("utf-8", errors="replace")
        return bool(data)

    def expect(self, text: str, timeout: float = 120.0) -> str:
        """Read until ``text`` appears; returns everything before it and consumes through it."""
        deadline = time.monotonic() + timeout
        while text not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not seen in {timeout} s; got {self.buffer[-2000:]!r}")
            if not self._read(0.2) and self.proc.poll() is not None and not self._read(0.2):
                raise EOFError(f"process exited ({self.proc.returncode}) before {text!r}; got {self.buffer[-2000:]!r}")
        before, _, self.buffer = self.buffer.partition(text)
        return before

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def wait(self, timeout: float = 60.0) -> int:
        """Exit status; everything printed until then stays in ``buffer``."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0.1):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            raise TimeoutError(f"still running after {timeout} s; got {self.buffer[-2000:]!r}")
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
