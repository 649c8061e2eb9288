"""Runs ``spp-jax`` commands that are killed with SIGKILL at chosen moments, then rerun.

Each kill is a ``(marker, delay)`` pair: the command runs until a line of its output
contains ``marker``, ``delay`` seconds pass, and the process gets SIGKILL (no handler,
no clean-up: as a machine losing power or the OOM killer would). After the last kill
the same command runs to its end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "spp_jax", *args]


def one_device_env(**extra: str) -> dict[str, str]:
    """The environment of a command run here: this checkout, one CPU device (the
    forced host devices of conftest.py can miss XLA's all-reduce rendezvous on a
    loaded 2-core machine)."""
    env = dict(os.environ, PYTHONPATH=REPO, **extra)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 600) -> str:
    """Runs the command to its end; returns its output (fails the test on exit != 0)."""
    proc = subprocess.run(
        command(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout + proc.stderr


def run_killed(
    args: list[str], env: dict[str, str], kills: list[tuple[str, float]], timeout: float = 600
) -> list[str]:
    """Runs the command once per kill, killing it as described above, then once to its
    end. Returns the output of every attempt.

    Raises:
      AssertionError: a marker never showed (the command ended first), or the last
        run failed.
    """
    outputs = []
    for marker, delay in kills:
        proc = subprocess.Popen(
            command(args), cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        lines, seen, t0 = [], False, time.monotonic()
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                seen = True
                time.sleep(delay)
                proc.kill()
                break
            if time.monotonic() - t0 > timeout:
                proc.kill()
                break
        proc.wait()
        proc.stdout.close()
        outputs.append("".join(lines))
        assert seen, f"{marker!r} never showed before the command ended:\n{outputs[-1][-3000:]}"
        assert proc.returncode == -9, (marker, proc.returncode)
    outputs.append(run(args, env, timeout))
    return outputs
