"""hexgen's own commands on the hosts of an emulated cluster: node agents, the head's `hexgen serve`, and
`hexgen bench serve` run from a host (the head's addresses exist only inside the cluster's namespaces, so
whatever talks to the server runs in one of them too)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from planning.emulation.harness import EmulatedCluster

REPO = Path(__file__).resolve().parents[2]


def hexgen_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "server.entrypoint", *args]


class HostProcess:
    """A hexgen command running on one host, its output kept in a log file."""

    def __init__(self, cluster: EmulatedCluster, host: str, argv: list[str], log_path: Path, env: dict):
        self.cluster, self.host, self.log_path = cluster, host, log_path
        self._log = open(log_path, "w")
        self.process = cluster.popen(host, argv, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` s; the exit status (None if it had to be killed)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                self._log.close()
                return None
        self._log.close()
        return self.process.returncode


def start_agent(cluster: EmulatedCluster, host: str, head: str, port: int, env: dict, log_dir: Path,
                *args: str) -> HostProcess:
    """`hexgen node` on `host` (with `args`, e.g. its budget), joining the head's cluster port (it retries
    until the head is up)."""
    argv = hexgen_argv("node", "--head", f"{cluster.address(head)}:{port}", "--name", host, *args)
    return HostProcess(cluster, host, argv, log_dir / f"agent-{host}.log", env)


def start_head(cluster: EmulatedCluster, head: str, config_path: Path, http_port: int, env: dict,
               log_path: Path) -> HostProcess:
    """`hexgen serve --config` on the head, HTTP on the head's loopback."""
    argv = hexgen_argv("serve", "--config", str(config_path), "--host", "127.0.0.1", "--port", str(http_port))
    return HostProcess(cluster, head, argv, log_path, env)


def wait_healthy(server: HostProcess, http_port: int, timeout: float) -> float:
    """Poll /health from inside the server's host until 200; seconds waited. RuntimeError on exit or timeout."""
    started = time.monotonic()
    url = f"http://127.0.0.1:{http_port}/health"
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"`hexgen serve` on {server.host} exited with {server.process.returncode}:\n"
                               f"{server.output[-4000:]}")
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"`hexgen serve` on {server.host} not healthy within {timeout:g} s:\n{server.output[-4000:]}")
        probe = server.cluster.run(server.host, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2", url],
                                   timeout=10)
        if probe.stdout.strip() == "200":
            return time.monotonic() - started
        time.sleep(2.0)


def bench_serve(cluster: EmulatedCluster, host: str, http_port: int, *, rate: float, num_prompts: int,
                input_len: int, output_len: int, seed: int, json_path: Path, env: dict, timeout: float) -> dict:
    """`hexgen bench serve` from `host` against the server on its loopback; its JSON report (config, summary,
    per-request records)."""
    argv = hexgen_argv("bench", "serve", "--base-url", f"http://127.0.0.1:{http_port}", "--dataset", "random",
                       "--input-len", str(input_len), "--output-len", str(output_len), "--num-prompts", str(num_prompts),
                       "--request-rate", str(rate), "--seed", str(seed), "--json", str(json_path))
    run = cluster.run(host, argv, env={**env, "TQDM_DISABLE": "1"}, cwd=REPO, timeout=timeout)
    if not json_path.is_file():
        raise RuntimeError(f"`hexgen bench serve` at {rate:g} req/s failed ({run.returncode}):\n"
                           f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(json_path.read_text())

