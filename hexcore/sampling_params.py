"""What a request asks of the sampler. Validated on construction: a bad value is a ValueError that
names the offending parameter (`err.param`), so the HTTP layer can answer 400 with it."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


class InvalidParameter(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on each logit_bias value


@dataclass(frozen=True)
class GrammarSpec:
    """What a constrained request's output must match (structured outputs), as text the workers compile
    (hexcore/grammar.py): a JSON Schema (JSON text), "json_object" (any JSON object, source ""), a regex,
    a choice among strings (a JSON list of them) or a Lark grammar. Frozen and hashable: the workers cache
    compiled grammars by it."""

    kind: str
    source: str = ""

    def __post_init__(self):
        if self.kind not in GRAMMAR_KINDS:
            raise InvalidParameter("grammar", f"grammar kind must be one of {GRAMMAR_KINDS}")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives per sampled token (0: only the sampled one)
    prompt_logprobs: int | None = None  # same, for every prompt token (echo + logprobs scoring)
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit before sampling)
    grammar: GrammarSpec | None = None  # structured outputs: only tokens the grammar allows are sampled

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        checks = [
            ("n", self.n >= 1, "n must be at least 1"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "min_tokens must be non-negative"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "min_tokens must not exceed max_tokens"),
            ("temperature", 0.0 <= self.temperature <= 2.0, "temperature must be in [0, 2]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "top_k must be -1 (disabled) or a non-negative integer"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            ("repetition_penalty", 0 < self.repetition_penalty < math.inf, "repetition_penalty must be positive and finite"),
            ("seed", self.seed is None or -2**63 <= self.seed < 2**63, "seed must fit in 64 bits"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "prompt_logprobs must be in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            ("stop", len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings"),
            ("stop", all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
             f"stop strings have at most {MAX_STOP_STRING_CHARS} characters"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            ("logit_bias", all(t >= 0 and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for t, b in self.logit_bias),
             f"logit_bias maps token ids to values in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise InvalidParameter(param, message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
