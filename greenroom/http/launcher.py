"""Start and stop the HTTP server processes of a node.

`python -m greenroom.http` runs uvicorn with `--workers` processes sharing one port; each
process runs `app.create_app` and talks to the node's frontend through the client library, so
HTTP parsing, tokenization and JSON never run on the node's event loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from greenroom.http.settings import ENV, HttpSettings


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the node's process dies, however it dies."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HttpServer:
    """The `python -m greenroom.http` child process (and its uvicorn workers)."""

    def __init__(self, proc: subprocess.Popen, host: str, port: int, metrics_dir: str) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self._metrics_dir = metrics_dir

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @classmethod
    def start(
        cls, settings: HttpSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1
    ) -> HttpServer:
        port = port or free_port(host)
        metrics_dir = tempfile.mkdtemp(prefix="greenroom-http-metrics-")
        env = {**os.environ, ENV: settings.to_env(), "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        cmd = [sys.executable, "-m", "greenroom.http", "--host", host, "--port", str(port)]
        cmd += ["--workers", str(workers)]
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
        return cls(proc, host, port, metrics_dir)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Return once the port accepts connections; raise if the process died or timed out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the HTTP server exited with status {self.proc.returncode} "
                    f"(is port {self.port} free?)"
                )
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the HTTP server did not listen on {self.url} in {timeout} s")
            await asyncio.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
