"""`hexgen serve` as a child process, for tests, benchmarks and experiments: its output is kept,
`wait_healthy()` polls /health, `stop()` signals it and waits for its exit status."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class ServeProcess:
    def __init__(self, config_path: Path | str, port: int, *args: str, host: str = "127.0.0.1",
                 prefix: list[str] = (), env: dict | None = None):
        """`prefix` runs the command inside something (e.g. `ip netns exec NS`); `args` are extra flags."""
        self.url = f"http://{host}:{port}"
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "server.entrypoint", "serve", "--config", str(config_path),
             "--host", host, "--port", str(port), *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_healthy(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy within {seconds} s:\n{self.output}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
