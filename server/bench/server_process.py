"""A server under test in a process group of its own (the bench commands that start servers):
start, wait for /health, its CPU seconds and resident memory, stop the whole group."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec (Linux; best effort)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the finally blocks still stop the servers
        pass


def _group_stats(pgid: int) -> list[list[str]]:
    """/proc/PID/stat fields after the command name of the live processes in group `pgid`
    (empty without /proc): state ppid pgrp ... utime(11) stime(12) ... rss(21)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    found = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            found.append(fields)
    return found


def group_rss_bytes(pgid: int) -> int | None:
    """Resident memory of the live processes in group `pgid` (None without /proc)."""
    stats = _group_stats(pgid)
    return sum(int(f[21]) for f in stats) * os.sysconf("SC_PAGE_SIZE") if stats else None


def group_cpu_seconds(pgid: int) -> float | None:
    """User + system CPU seconds of the live processes in process group `pgid` (None without
    /proc)."""
    stats = _group_stats(pgid)
    if not stats:
        return None
    return sum(int(f[11]) + int(f[12]) for f in stats) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """One server in a process group (session) of its own, its output in a log file."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str],
                 log_path: Path) -> None:
        self.name, self.cmd, self.port, self.env, self.log_path = name, cmd, port, env, log_path
        self.proc: subprocess.Popen | None = None
        self.served_model: str | None = None
        self.stopped = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n$ {shlex.join(self.cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True, preexec_fn=_die_with_parent)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"{self.name} exited (status {code}); last lines of "
                               f"{self.log_path}:\n{self.log_tail()}")

    def wait_ready(self, timeout: float, poll: float = 1.0) -> str:
        """Poll /health until 200 (the engine is loaded: /v1/models can answer earlier), then
        /v1/models; return its first model's name."""
        root = self.base_url.removesuffix("/v1")
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                if httpx.get(f"{root}/health", timeout=5).status_code == 200:
                    response = httpx.get(f"{self.base_url}/models", timeout=5)
                    if response.status_code == 200 and response.json().get("data"):
                        self.served_model = str(response.json()["data"][0]["id"])
                        return self.served_model
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s; last "
                                   f"lines of {self.log_path}:\n{self.log_tail()}")
            time.sleep(poll)

    def cpu_seconds(self) -> float | None:
        return None if self.proc is None else group_cpu_seconds(self.proc.pid)

    def rss_bytes(self) -> int | None:
        return None if self.proc is None else group_rss_bytes(self.proc.pid)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the whole group, SIGKILL after `grace` seconds; safe to call twice."""
        if self.proc is None or self.stopped:
            return
        self.stopped = True
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived the group leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
