"""A real `python -m api` process for as long as a `with` block lasts, for scripts, benchmarks and
tests that want the server as users run it rather than the app in process:

    with serve_in_subprocess(index_dir, log_dir) as (url, process, stderr):
        httpx.post(url + "/attribute", json={...})

It is started on a free loopback port, yielded once GET /health answers 200, and stopped on exit
(SIGTERM, then SIGKILL). Its stdout and stderr go to the files `out` and `err` in `log_dir`."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, NamedTuple

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding this `api` package


class ServerStartError(RuntimeError):
    """The server exited before it answered /health, or did not answer in time."""


class Served(NamedTuple):
    url: str  # http://host:port, no trailing slash
    process: subprocess.Popen
    stderr: IO[str]  # the server's stderr file, open for reading back (seek(0) first)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, grace_s: float = 15) -> int:
    """End `process` if it still runs: SIGTERM, then SIGKILL after `grace_s` seconds (SIGKILL at once
    when 0). Returns its exit status."""
    if process.poll() is None:
        if grace_s > 0:
            process.terminate()
            try:
                return process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        process.kill()
    return process.wait()


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def _healthy(url: str) -> bool:
    try:
        with _DIRECT.open(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def serve_in_subprocess(index_dir, log_dir, *, args: tuple[str, ...] = (), host: str = "127.0.0.1",
                        port: int | None = None, env: Mapping[str, str] | None = None,
                        ready_s: float = 60, stop_s: float = 15) -> Iterator[Served]:
    """`python -m api --index index_dir` (more options in `args`; `env` set over this process's
    environment) from this same `api` package, yielded once /health answers. Raises
    ServerStartError if it exits first or is not ready within `ready_s` seconds."""
    port = port or free_port(host)
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), child_env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "api", "--index", str(index_dir), "--host", host, "--port", str(port), *args]
    out, err = open(Path(log_dir) / "out", "w+"), open(Path(log_dir) / "err", "w+")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env)
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while not _healthy(url):
            if proc.poll() is not None:
                err.seek(0)
                raise ServerStartError(f"server exited with {proc.returncode}: {err.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"server not ready within {ready_s} s")
            time.sleep(0.2)
        yield Served(url, proc, err)
    finally:
        stop(proc, stop_s)
        out.close()
        err.close()
