"""Worker processes: a worker that dies during startup is named with its device, rank and reason; workers
never outlive the driver's LLM, whether it ends normally, by an exception or by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hexcore.config import parse_config
from hexcore.engine.llm import LLM
from hexcore.sampling_params import SamplingParams
from hexcore.executor.replica_workers import WorkerStartupError
from tests.conftest import deployment

pytestmark = pytest.mark.slow  # starts worker processes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
        return stat.read().split()[2] != "Z"


def test_worker_failing_at_startup_names_device_rank_and_reason(tiny_model_dir):
    raw = deployment(tiny_model_dir, [(1, 4)])
    raw["replicas"][0]["stages"].append({"devices": ["cuda:0"], "layers": 4})
    with pytest.raises(WorkerStartupError, match=r"stage 1 rank 1 \(device cuda:0\) failed during startup: "
                                                 r"ValueError: device cuda:0 requested but CUDA is not available"):
        LLM(parse_config(raw))


def test_workers_stop_with_the_llm_also_after_an_exception(tiny_model_dir):
    llm = LLM(parse_config(deployment(tiny_model_dir, [(2, 4), (1, 4)])))
    pids = [p.pid for r in llm.core.replicas for p in r.workers.processes]
    assert len(pids) == 3 and all(_alive(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="boom"):
        with llm:
            llm.generate(["hello"], SamplingParams(max_tokens=4))
            raise RuntimeError("boom")
    assert not any(_alive(pid) for pid in pids)


def test_ctrl_c_stops_the_driver_and_every_worker(tiny_model_dir, tmp_path):
    script = tmp_path / "serve_forever.py"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, time
        # a terminal's Ctrl-C: Python's handler even if this process inherited SIGINT ignored (as jobs
        # started with & by a non-interactive shell do, and with them every child)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {os.getcwd()!r})
        from hexcore.config import parse_config
        from hexcore.engine.llm import LLM
        from tests.conftest import deployment
        if __name__ == "__main__":
            with LLM(parse_config(deployment({str(tiny_model_dir)!r}, [(1, 4), (1, 4)]))) as llm:
                print(*[p.pid for r in llm.core.replicas for p in r.workers.processes], flush=True)
                time.sleep(600)
    """))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in driver.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    driver.send_signal(signal.SIGINT)
    driver.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)
