"""Run a command with its stderr on a pseudo-terminal (python's ``pty``), for the tests of
what is drawn only on a terminal (progress bars)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path


def terminal_env() -> dict[str, str]:
    """The environment without V2G_* settings, with a terminal type and width."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("V2G_")}
    env.pop("NO_COLOR", None)
    return env | {"TERM": "xterm-256color", "COLUMNS": "100"}


def run_on_pty(argv: list[str], *, cwd: Path, timeout: float = 120.0) -> tuple[int, str, bytes]:
    """(exit status, what reached the terminal, stdout) of ``argv`` run with stderr on a
    pty and stdout on a pipe; killed after ``timeout`` seconds."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        env=terminal_env(),
        cwd=cwd,
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
    return proc.returncode, seen.decode(errors="replace"), out


def run_on_pipe(argv: list[str], *, cwd: Path, timeout: float = 120.0) -> tuple[int, str, str]:
    """(exit status, stderr, stdout) of ``argv`` with both on pipes."""
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=terminal_env(), cwd=cwd
    )
    return proc.returncode, proc.stderr, proc.stdout
