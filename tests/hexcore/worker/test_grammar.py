"""Grammar masks on the sampling worker (structured outputs), without worker processes: what a sequence
may sample, replay from its tokens (failover, preemption), deferral while a grammar compiles, and the
sampler's order (bans, bias, mask, then temperature)."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest
import torch

from hexcore.executor.messages import SeqSampling
from hexcore.grammar import choice_spec, grammar_error, json_schema_spec
from hexcore.sampling_params import GrammarSpec, InvalidParameter, SamplingParams
from hexcore.worker.grammar import DEFERRED, GrammarMatchers
from hexcore.worker.sampler import sample, sample_one
from tests.conftest import build_tokenizer

VOCAB = 416  # the tiny models' logits (the tokenizer has fewer tokens)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                 "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "home"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("grammar-tokenizer")
    build_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def grammars(tokenizer_dir):
    matchers = GrammarMatchers(tokenizer_dir, VOCAB)
    matchers._tokenizer.result()  # loaded, as it is long before the first request in a worker
    return matchers


def seq(grammar: GrammarSpec, outputs=(), seq_id: int = 7, **params) -> SeqSampling:
    params.setdefault("temperature", 1.0)
    return SeqSampling(SamplingParams(grammar=grammar, **params), seed=params.get("seed") or 0,
                       num_generated=len(outputs), output_token_ids=tuple(outputs), seq_id=seq_id)


def ready_mask(grammars: GrammarMatchers, spec: SeqSampling) -> torch.Tensor:
    grammars.compiled(spec.params.grammar).result()
    [mask] = grammars.allowed([spec])
    return mask


def generate(grammars, tokenizer, grammar, seed, seq_id=0, max_tokens=300) -> tuple[list[int], str]:
    """Random logits, constrained: the worst model there is."""
    outputs: list[int] = []
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_tokens):
        spec = seq(grammar, outputs, seq_id=seq_id, seed=seed)
        mask = ready_mask(grammars, spec)
        logits = torch.randn(VOCAB, generator=generator) * 3
        token = sample(logits[None], [spec], [mask])[0].token_id
        if token == tokenizer.eos_token_id:
            return outputs, tokenizer.decode(outputs)
        outputs.append(token)
    raise AssertionError("the grammar never ended: " + tokenizer.decode(outputs))


def test_random_logits_under_a_json_schema_always_give_valid_json(grammars, tokenizer):
    grammar = json_schema_spec(SCHEMA)
    for seed in range(8):
        _, text = generate(grammars, tokenizer, grammar, seed, seq_id=seed)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert text.startswith('{"name": "')  # properties in the schema's order, the fixed layout


def test_regex_choice_and_json_object(grammars, tokenizer):
    for seed in range(4):
        _, text = generate(grammars, tokenizer, GrammarSpec("regex", "[a-c]{2,4}-[0-9]"), seed, seq_id=100 + seed)
        assert len(text) in (4, 5, 6) and text[-2] == "-" and text[-1].isdigit()
        _, text = generate(grammars, tokenizer, choice_spec(["cat", "dog fox", 'a "q"']), seed, seq_id=200 + seed)
        assert text in ("cat", "dog fox", 'a "q"')
        tokens, text = generate(grammars, tokenizer, GrammarSpec("json_object"), seed, seq_id=300 + seed,
                                max_tokens=2000)
        assert isinstance(json.loads(text), dict)


def test_a_matcher_replays_the_tokens_of_a_sequence_it_has_not_seen(grammars, tokenizer_dir, tokenizer):
    """Failover or eviction: a worker with no state for the sequence gives the same masks."""
    grammar = json_schema_spec(SCHEMA)
    tokens, _ = generate(grammars, tokenizer, grammar, seed=3, seq_id=1)
    fresh = GrammarMatchers(tokenizer_dir, VOCAB)
    for cut in (0, 1, len(tokens) // 2, len(tokens)):
        incremental = ready_mask(grammars, seq(grammar, tokens[:cut], seq_id=1000))  # consumes the difference
        replayed = ready_mask(fresh, seq(grammar, tokens[:cut], seq_id=cut))
        assert torch.equal(incremental, replayed)
    # the same sequence id with fewer tokens than its matcher consumed (its state is stale): replayed
    assert torch.equal(ready_mask(grammars, seq(grammar, tokens[:1], seq_id=1000)),
                       ready_mask(fresh, seq(grammar, tokens[:1], seq_id=99)))


def test_a_finished_grammar_allows_only_eos(grammars, tokenizer):
    grammar = choice_spec(["cat"])
    tokens = tokenizer.encode("cat", add_special_tokens=False)
    mask = ready_mask(grammars, seq(grammar, tokens))
    assert mask.nonzero().flatten().tolist() == [tokenizer.eos_token_id]


def test_a_row_whose_grammar_is_compiling_is_deferred_and_others_are_not_held(grammars, monkeypatch):
    release = threading.Event()
    compile_ = grammars._compile
    monkeypatch.setattr(grammars, "_compile", lambda spec: (release.wait(10), compile_(spec))[1])
    slow, plain = seq(GrammarSpec("regex", "[ab]+")), SeqSampling(SamplingParams(temperature=0.0), 0, 0)
    masks = grammars.allowed([slow, plain])
    assert masks == [DEFERRED, None] and grammars.num_deferred == 1
    release.set()
    grammars.compiled(slow.params.grammar).result()
    assert grammars.allowed([slow])[0].dtype == torch.bool


def test_the_mask_comes_after_bans_and_bias_and_before_temperature():
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    allowed = torch.tensor([False, True, True, False, True])
    greedy = SeqSampling(SamplingParams(temperature=0.0), 0, 0)
    assert sample_one(logits, greedy, allowed).token_id == 1
    biased = SeqSampling(SamplingParams(temperature=0.0, logit_bias={4: 10.0}), 0, 0)
    assert sample_one(logits, biased, allowed).token_id == 4
    # min_tokens bans eos, but the grammar allows only eos: the grammar wins
    only_eos = torch.tensor([False, False, False, True, False])
    banned = SeqSampling(SamplingParams(temperature=0.0, min_tokens=3), 0, 0, banned_token_ids=(3,))
    assert sample_one(logits, banned, only_eos).token_id == 3
    for seed in range(20):  # a sampled token is always allowed
        hot = SeqSampling(SamplingParams(temperature=2.0, top_p=0.9), seed, seed)
        assert allowed[sample_one(logits, hot, allowed).token_id]


def test_logit_bias_is_validated_and_applied():
    logits = torch.zeros(5)
    assert sample(logits[None], [SeqSampling(SamplingParams(temperature=0.0, logit_bias={3: 1.0}), 0, 0)])[0].token_id == 3
    never = SeqSampling(SamplingParams(temperature=1.0, logit_bias={0: -100, 1: -100, 2: -100, 3: -100}), 5, 0)
    assert sample_one(logits, never).token_id == 4
    with pytest.raises(InvalidParameter) as err:
        SamplingParams(logit_bias={1: 101.0})
    assert err.value.param == "logit_bias"


@pytest.mark.parametrize("spec, fragment", [
    (GrammarSpec("json_schema", '{"type": "strin"}'), "strin"),
    (GrammarSpec("json_schema", "[1, 2]"), ""),
    (GrammarSpec("regex", "[a-z"), "unclosed"),
    (GrammarSpec("choice", "[]"), "non-empty"),
    (GrammarSpec("lark", "start: foo"), "foo"),
])
def test_invalid_grammars_are_named(spec, fragment):
    error = grammar_error(spec)
    assert error is not None and fragment in error


def test_valid_grammars_pass():
    for spec in (json_schema_spec(SCHEMA), GrammarSpec("json_object"), GrammarSpec("regex", r"\d+"),
                 choice_spec(["a", "b"]), GrammarSpec("lark", 'start: "x" | "y"')):
        assert grammar_error(spec) is None


def test_batched_masked_greedy_rows_equal_row_by_row():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=generator)
    masks = [torch.rand(50, generator=generator) > 0.7 for _ in range(6)]
    grammar = GrammarSpec("json_object")
    specs = [SeqSampling(SamplingParams(temperature=0.0, grammar=grammar), 0, 0),
             SeqSampling(SamplingParams(temperature=0.0), 0, 0),
             SeqSampling(SamplingParams(temperature=0.0, grammar=grammar, logprobs=2), 0, 0),
             SeqSampling(SamplingParams(temperature=0.8, seed=3, grammar=grammar), 3, 1),
             SeqSampling(SamplingParams(temperature=0.0, grammar=grammar), 0, 0, banned_token_ids=(1, 2)),
             SeqSampling(SamplingParams(temperature=0.0, grammar=grammar), 0, 0)]
    allowed = [m if s.params.grammar is not None else None for m, s in zip(masks, specs)]
    batched = [t.token_id for t in sample(logits, specs, allowed)]
    assert batched == [sample_one(row, spec, mask).token_id for row, spec, mask in zip(logits, specs, allowed)]
