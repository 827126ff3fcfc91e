"""One deployment across three hosts (network namespaces on shaped links, planning/emulation): the head
and two node agents (`hexgen node`). Stages on different hosts with different TP degrees give HF's
greedy tokens and log-probs; a wrong token and a missing node are refused with messages on both sides;
an agent SIGKILLed mid-run fails over only the replica that had workers there."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import deployment
from tests.hexcore.hf_reference import greedy_reference

pytestmark = pytest.mark.slow  # namespaces, agents and worker processes

TOKEN = "a-cluster-token-for-tests-only"
PORT = 8478
NUM_NEW_TOKENS = 16
PROMPTS = ["The capital of France is", "Hello world", "A quick brown fox jumps over the lazy dog"]
TOLERANCE = 1e-4
REPO = Path(__file__).resolve().parents[3]

GENERATE = textwrap.dedent('''
    import json, sys
    from hexcore.config import load_config
    from hexcore.engine.llm import LLM
    from hexcore.sampling_params import SamplingParams

    if __name__ == "__main__":
        params = SamplingParams(temperature=0.0, max_tokens={num_tokens}, ignore_eos=True, logprobs=5)
        with LLM(load_config(sys.argv[1])) as llm:
            results = llm.generate(json.loads(sys.argv[2]), [params] * {num_prompts})
            print("RESULTS " + json.dumps([{{"prompt": r.prompt_token_ids, "tokens": r.token_ids, "replica": r.replica,
                                            "logprobs": [[lp.token_id, lp.logprob, lp.top] for lp in r.completions[0].logprobs]}}
                                           for r in results]), flush=True)
''').format(num_tokens=NUM_NEW_TOKENS, num_prompts=len(PROMPTS))


def environment() -> dict:
    return {**os.environ, "HEXGEN_CLUSTER_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}


def start_agent(cluster, name: str, head: str, token: str = TOKEN) -> subprocess.Popen:
    return cluster.popen(name, [sys.executable, "-m", "server.entrypoint", "node", "--head", f"{head}:{PORT}",
                                "--name", name], env={**environment(), "HEXGEN_CLUSTER_TOKEN": token}, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def write_deployment(tmp_path: Path, model_dir: Path, cluster, replicas: list[list[tuple[list[str], int]]],
                     engine: dict | None = None, **cluster_fields) -> Path:
    raw = deployment(model_dir, [(1, 8)], **(engine or {}))
    raw["replicas"] = [{"name": f"r{i}", "stages": [{"devices": devices, "layers": layers} for devices, layers in stages]}
                       for i, stages in enumerate(replicas)]
    raw["cluster"] = {"node_name": "head", "host": cluster.address("head"), "port": PORT,
                      "join_timeout_seconds": 60, **cluster_fields}
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def three_hosts(emulated_cluster):
    return emulated_cluster(["head", "a", "b"], bandwidth_mbit={("head", "a"): 1000, ("head", "b"): 1000,
                                                                ("a", "b"): 200})


def test_stages_on_other_hosts_with_other_tp_degrees_match_hf(three_hosts, tiny_model_dir, tmp_path):
    cluster = three_hosts
    agents = [start_agent(cluster, name, cluster.address("head")) for name in ("a", "b")]
    path = write_deployment(tmp_path, tiny_model_dir, cluster, [
        [(["cpu"], 8)],  # on the head
        [(["a/cpu", "a/cpu"], 5), (["b/cpu"], 3)],  # TP2 on a, then TP1 on b
    ])
    script = tmp_path / "generate.py"
    script.write_text(GENERATE)
    run = cluster.run("head", [sys.executable, str(script), str(path), json.dumps(PROMPTS)], env=environment(),
                      cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert {r["replica"] for r in results} == {"r0", "r1"}, "both replicas must serve"
    for result in results:
        ref_tokens, ref_logprobs = greedy_reference(tiny_model_dir, result["prompt"], NUM_NEW_TOKENS)
        assert result["tokens"] == ref_tokens
        for i, (token_id, logprob, top) in enumerate(result["logprobs"]):
            position = len(result["prompt"]) - 1 + i
            assert abs(logprob - ref_logprobs[position, token_id]) < TOLERANCE
            for other, value in top.items():
                assert abs(value - ref_logprobs[position, int(other)]) < TOLERANCE
    for agent in agents:
        assert agent.poll() is None, "agents stay up after the deployment ends"


def test_a_wrong_token_and_a_missing_node_are_refused_with_messages_on_both_sides(three_hosts, tiny_model_dir,
                                                                                   tmp_path):
    cluster = three_hosts
    path = write_deployment(tmp_path, tiny_model_dir, cluster, [[(["a/cpu"], 4), (["b/cpu"], 4)]],
                            join_timeout_seconds=8)
    head = cluster.popen("head", [sys.executable, "-m", "server.entrypoint", "serve", "--config", str(path),
                                  "--port", "8000", "--log-level", "info"], env=environment(), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wrong = start_agent(cluster, "a", cluster.address("head"), token="not-the-cluster-token-at-all")
    agent_output, _ = wrong.communicate(timeout=60)
    assert wrong.returncode == 2 and "refused the cluster token" in agent_output
    head_output, _ = head.communicate(timeout=60)
    assert head.returncode == 1
    assert "wrong cluster token" in head_output
    assert "nodes did not join within 8 s: a, b" in head_output


def test_a_killed_agent_fails_over_only_its_replica(three_hosts, tiny_model_dir, tmp_path):
    cluster = three_hosts
    agents = {name: start_agent(cluster, name, cluster.address("head")) for name in ("a", "b")}
    path = write_deployment(tmp_path, tiny_model_dir, cluster, [
        [(["cpu"], 8)],  # on the head
        [(["a/cpu"], 4), (["b/cpu"], 4)],  # across a and b
    ], engine={"max_restart_attempts": 1000}, join_timeout_seconds=60)  # b stays down: r1 keeps retrying
    script = tmp_path / "failover.py"
    script.write_text(textwrap.dedent('''
        import json, sys
        from hexcore.config import load_config
        from hexcore.engine.llm import LLM
        from hexcore.sampling_params import SamplingParams

        if __name__ == "__main__":
            params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
            with LLM(load_config(sys.argv[1])) as llm:
                reference = [r.token_ids for r in llm.generate(["Hello world"] * 6, params)]
                core = llm.core
                for i in range(6):
                    core.add_request(f"q{i}", llm.encode("Hello world"), params)
                tokens = {f"q{i}": [] for i in range(6)}
                errors, num_steps = [], 0
                while core.has_unfinished:
                    for out in core.step(timeout=1.0):
                        tokens[out.request_id] += out.choices[0].token_ids if out.choices else []
                        if out.error is not None:
                            errors.append(out.error.message)
                    num_steps += 1
                    if num_steps == 3:
                        print("KILL", flush=True)
                        sys.stdin.readline()  # the test kills agent b, then says go
                down = {r.name: r.num_resumed for r in core.replicas}
                print("RESULTS " + json.dumps({"same": list(tokens.values()) == reference, "errors": errors,
                                               "resumed": down}), flush=True)
    '''))
    run = cluster.popen("head", [sys.executable, str(script), str(path)], env=environment(), cwd=REPO,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in run.stdout:
        lines.append(line)
        if line.strip() == "KILL":
            agents["b"].kill()  # the agent only: its workers die with it (they are its children)
            cluster.kill_host("b")
            run.stdin.write("go\n")
            run.stdin.flush()
        if line.startswith("RESULTS "):
            break
    run.wait(timeout=120)
    result = json.loads(next(line for line in lines if line.startswith("RESULTS "))[8:])
    assert result["errors"] == [] and result["same"], "".join(lines)
    assert result["resumed"]["r1"] > 0 and result["resumed"]["r0"] == 0
    assert agents["a"].poll() is None, "the other agent stays up"


CHAT = textwrap.dedent('''
    import sys
    import openai

    client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0.0, stream=True)
    print("ANSWER " + "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices), flush=True)
''')


def test_smollm2_chat_streams_across_hosts_and_sigterm_leaves_no_worker(three_hosts, tmp_path):
    cluster = three_hosts
    agents = {name: start_agent(cluster, name, cluster.address("head")) for name in ("a", "b")}
    raw = {"model": "default", "replicas": [{"name": "r0", "stages": [
        {"devices": ["cpu"], "layers": 10}, {"devices": ["a/cpu"], "layers": 10}, {"devices": ["b/cpu"], "layers": 10}]}],
        "cluster": {"node_name": "head", "host": cluster.address("head"), "port": PORT, "join_timeout_seconds": 60}}
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(raw))
    head = cluster.popen("head", [sys.executable, "-m", "server.entrypoint", "serve", "--config", str(path),
                                  "--port", "8000", "--log-level", "info"], env=environment(), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (tmp_path / "chat.py").write_text(CHAT)
    deadline = time.monotonic() + 600
    while True:  # the chat client polls until the server answers
        chat = cluster.run("head", [sys.executable, str(tmp_path / "chat.py"), "http://127.0.0.1:8000"],
                           env=environment(), cwd=REPO, timeout=300)
        if chat.returncode == 0 or time.monotonic() > deadline or head.poll() is not None:
            break
        time.sleep(2)
    assert chat.returncode == 0, chat.stdout + chat.stderr
    assert "Paris" in chat.stdout
    workers = {host: [pid for pid in cluster.pids(host) if Path(f"/proc/{pid}/comm").read_text().startswith("hx-")]
               for host in ("head", "a", "b")}
    assert all(workers.values()), workers  # a worker on every host
    head.send_signal(signal.SIGTERM)
    output, _ = head.communicate(timeout=60)
    assert head.returncode == 0, output
    time.sleep(2)
    assert cluster.pids("head") == [], "nothing of hexgen is left on the head"
    for host in ("a", "b"):
        alive = [pid for pid in workers[host] if Path(f"/proc/{pid}").exists()]
        assert alive == [], f"workers left on {host}"
        assert agents[host].poll() is None, "the agents stay up for the next deployment"


START = textwrap.dedent('''
    import logging, sys
    from hexcore.config import load_config
    from hexcore.engine.llm import LLM
    from hexcore.sampling_params import SamplingParams

    if __name__ == "__main__":
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        try:
            with LLM(load_config(sys.argv[1])) as llm:
                out = llm.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
                print("BLOCKS", llm.core.replicas[0].block_manager.num_blocks, len(out[0].token_ids), flush=True)
        except Exception as err:
            print("ERROR", err, flush=True)
''')


def test_each_host_sizes_its_workers_and_resolves_the_model_itself(three_hosts, tiny_model_dir, tmp_path):
    """Two-phase start: every worker reports what its host's budget (`hexgen node --memory-gb`) leaves
    beside its weights and the replica takes the fewest; a host without the model fails the start with a
    message naming the device, its node and its host."""
    cluster = three_hosts

    def agent(name: str, *budget: str) -> subprocess.Popen:
        return cluster.popen(name, [sys.executable, "-m", "server.entrypoint", "node", "--head",
                                    f"{cluster.address('head')}:{PORT}", "--name", name, *budget],
                             env=environment(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(model: str, cwd: Path) -> str:
        path = write_deployment(tmp_path, tiny_model_dir, cluster, [[(["a/cpu"], 4), (["b/cpu"], 4)]],
                                engine={"num_kv_blocks": None, "max_num_seqs": 256})
        raw = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**raw, "model": model}))
        run = cluster.run("head", [sys.executable, str(tmp_path / "start.py"), str(path)], env=environment(),
                          cwd=cwd, timeout=300)
        return run.stdout + run.stderr

    (tmp_path / "start.py").write_text(START)
    agents = {"a": agent("a", "--memory-gb", "0.02", "--num-cpus", "1"), "b": agent("b")}
    try:
        output = start(str(tiny_model_dir), REPO)
        room = re.search(r"replica r0: (\d+) KV blocks \(room for (\d+) on rank 0 .*, (\d+) on rank 1", output)
        assert room, output
        num_blocks, room_a, room_b = map(int, room.groups())
        assert num_blocks == room_a < room_b  # a's 20 MB budget decides (b gives all of its RAM)
        assert f"BLOCKS {num_blocks} 4" in output
        (tmp_path / "only-on-head").symlink_to(tiny_model_dir)  # a relative path the head's directory has
        output = start("only-on-head", tmp_path)
        assert "(device a/cpu) failed during startup: ValueError: on host" in output, output
        assert "model directory 'only-on-head' not found" in output, output
        # a budget below the weights fails the same way, saying so (tests/hexcore/test_hardware.py)
    finally:
        for process in agents.values():
            process.kill()
