"""Grammar-constrained generation over real worker processes: the mask is a pure function of a
sequence's tokens, so constrained requests (greedy, seeded, n > 1) get the same tokens on TP1,
[TP3, TP1] and two replicas, after preemption and after a failover (the new replica replays the
grammar from the tokens so far); every output follows its grammar."""

from __future__ import annotations

import json
import os
import signal

import jsonschema
import pytest

from hexcore.config import parse_config
from hexcore.engine.llm import LLM
from hexcore.grammar import choice_spec, json_schema_spec
from hexcore.sampling_params import GrammarSpec, SamplingParams
from tests.conftest import deployment

pytestmark = pytest.mark.slow  # starts worker processes

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "n": {"type": "integer", "minimum": 0, "maximum": 999},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "n", "tags"], "additionalProperties": False,
}
PROMPTS = ["The capital of France is", "Hello world", "A quick brown fox", "Once upon a time", "Tensor parallel",
           "cats and weather"]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=80, grammar=json_schema_spec(SCHEMA)),
    SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=80, grammar=json_schema_spec(SCHEMA)),
    SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=40, grammar=GrammarSpec("regex", "[a-z]{2,6}( [0-9]{1,3})?")),
    SamplingParams(temperature=1.0, seed=9, n=2, max_tokens=20, grammar=choice_spec(["yes", "no", "maybe not"])),
    SamplingParams(temperature=0.0, max_tokens=80, grammar=json_schema_spec(SCHEMA), min_tokens=3),
    SamplingParams(temperature=1.2, top_k=40, seed=11, max_tokens=80, grammar=json_schema_spec(SCHEMA)),
]


def check_outputs(results) -> list[list[list[int]]]:
    for params, result in zip(PARAMS, results):
        for completion in result.completions:
            assert completion.finish_reason == "stop", completion.text
            kind = params.grammar.kind
            if kind == "json_schema":
                jsonschema.validate(json.loads(completion.text), SCHEMA)
            elif kind == "choice":
                assert completion.text in ("yes", "no", "maybe not")
    return [[c.token_ids for c in result.completions] for result in results]


def run(model_dir, *replicas, **engine) -> tuple[list, LLM]:
    with LLM(parse_config(deployment(model_dir, *replicas, **engine))) as llm:
        results = llm.generate(PROMPTS, PARAMS)
        stats = llm.core.stats()
    return check_outputs(results), stats


@pytest.fixture(scope="module")
def reference(tiny_tied_model_dir):
    tokens, _ = run(tiny_tied_model_dir, [(1, 6)])
    return tokens


def test_tp3_tp1_pipeline_gives_the_same_constrained_tokens(tiny_tied_model_dir, reference):
    tokens, _ = run(tiny_tied_model_dir, [(3, 3), (1, 3)], max_num_batched_tokens=16)
    assert tokens == reference


def test_two_replicas_give_the_same_constrained_tokens(tiny_tied_model_dir, reference):
    tokens, stats = run(tiny_tied_model_dir, [(1, 6)], [(3, 3), (1, 3)])
    assert tokens == reference
    assert all(r.num_generated_tokens > 0 for r in stats.replicas)  # both served some


def test_preemption_replays_the_grammar(tiny_tied_model_dir, reference):
    tokens, stats = run(tiny_tied_model_dir, [(1, 6)], num_kv_blocks=14, max_num_batched_tokens=16)
    assert tokens == reference
    assert stats.replicas[0].num_preemptions > 0


def test_failover_resumes_the_grammar_on_another_replica(tiny_tied_model_dir, reference):
    raw = deployment(tiny_tied_model_dir, [(1, 6)], [(3, 3), (1, 3)])
    for name, replica in zip(("r0", "r1"), raw["replicas"]):
        replica.update(name=name, predicted_throughput_rps=1.0)
    with LLM(parse_config(raw)) as llm:
        core = llm.core
        for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS)):
            core.add_request(f"req-{i}", llm.encode(prompt), params)
        tokens = {f"req-{i}": [[] for _ in range(p.n)] for i, p in enumerate(PARAMS)}
        texts = {f"req-{i}": [""] * p.n for i, p in enumerate(PARAMS)}
        num_steps, killed = 0, False
        while core.has_unfinished:
            for output in core.step(timeout=1.0):
                assert output.error is None
                for delta in output.choices:
                    tokens[output.request_id][delta.index] += delta.token_ids
            num_steps += 1
            r1 = core.replicas[1]
            if not killed and num_steps >= 6 and r1.is_up and any(not s.is_finished for s in r1.scheduler.running):
                os.kill(r1.workers.processes[0].pid, signal.SIGKILL)
                killed = True
        assert killed and r1.num_resumed > 0
    assert [tokens[f"req-{i}"] for i in range(len(PROMPTS))] == reference
