"""Child processes with a log file each: vLLM engine workers, `overfill serve`, the load client.

Each starts in a process group of its own with its output in a log file, so that stopping it stops
everything vLLM started under it (engine core, workers) and nothing else; `wait` shows the child's
latest progress line while it runs and stops the group if the wait is interrupted (Ctrl-C).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from overfill.errors import OverfillError

PROGRESS = "overfill-progress: "  # children prefix the lines the parent shows as progress


def say(text: str) -> None:
    """In a child: one progress line for the parent to show (see `wait`)."""
    import sys

    print(f"{PROGRESS}{text}", file=sys.stderr, flush=True)


def start(argv: list[str], log: Path, env: dict[str, str], pass_fds: tuple[int, ...] = (), *,
          die_with_parent: bool = False) -> subprocess.Popen:
    """`argv` in a process group of its own, its output in `log`. `die_with_parent`: the child is sent SIGTERM if
    this process dies without stopping it (killed, say), so that no server outlives the command that started it
    (Linux; elsewhere the parent's own `stop` is all there is)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, pass_fds=pass_fds,
                                preexec_fn=_term_with_parent if die_with_parent else None)


def _term_with_parent() -> None:
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_all(procs: list[subprocess.Popen], grace_s: float = 20.0) -> None:
    """`stop` for several children at once: all are asked to stop first, so their grace periods overlap."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in procs:
        stop(proc, grace_s)


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the child's process group, SIGKILL to whatever is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(proc.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def wait(proc: subprocess.Popen, log: Path, report=None, timeout_s: float | None = None, what: str = "") -> int:
    """Wait for the child (stopping its group on Ctrl-C or after `timeout_s`), showing its progress lines."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            try:
                return proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                if report:
                    line = last_line(log, PROGRESS)
                    if line:
                        report(line[len(PROGRESS):])
                if deadline is not None and time.monotonic() > deadline:
                    raise OverfillError(f"{what or 'a vLLM child process'} took over {timeout_s:.0f} s and was stopped; "
                                        f"its log is {log}")
    except BaseException:
        stop(proc)
        raise
    finally:
        if proc.poll() is not None:
            _reap_group(proc)


def _reap_group(proc: subprocess.Popen) -> None:
    """The child exited: stop anything it left behind in its group (a vLLM engine core, say)."""
    if _group_alive(proc.pid):
        stop(proc, grace_s=10.0)


def last_line(log: Path, prefix: str = "") -> str:
    """The log's last non-empty line (that starts with `prefix`), from its last 16 KiB."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 16384, 0))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    found = [line.strip() for line in lines if line.strip() and line.strip().startswith(prefix)]
    return found[-1] if found else ""


def failure(what: str, code: int | None, log: Path) -> OverfillError:
    """One error line for a child that failed: its last log line, and where the whole log is."""
    return OverfillError(f"{what} failed (exit code {code}): {last_line(log)[:300] or 'no output'}; its whole log is {log}")
