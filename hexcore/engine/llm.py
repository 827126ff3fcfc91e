"""The offline API: `LLM(config).generate(prompts, params)` starts the workers, runs a batch of
prompts through the engine, and stops the workers (also on an exception or Ctrl-C)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hexcore.config import DeploymentConfig
from hexcore.executor.deployment import resolve
from hexcore.engine.client import RequestFailed
from hexcore.engine.core import EngineCore
from hexcore.outputs import ChoiceDelta, RequestOutput, TokenLogprob
from hexcore.sampling_params import SamplingParams


@dataclass
class Completion:
    """One choice, folded from its stream of deltas."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.token_ids += delta.token_ids
        self.text += delta.text
        self.finish_reason = delta.finish_reason
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    completions: list[Completion]  # one per choice (n)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    replica: str = ""
    is_finished: bool = False

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids

    @property
    def text(self) -> str:
        return self.completions[0].text

    def add(self, output: RequestOutput) -> None:
        self.replica = output.replica or self.replica
        self.prompt_logprobs = output.prompt_logprobs or self.prompt_logprobs
        for delta in output.choices:
            self.completions[delta.index].add(delta)
        self.is_finished = output.is_finished


class LLM:
    def __init__(self, config: DeploymentConfig):
        self.deployment = resolve(config)
        self.core = EngineCore.launch(self.deployment)
        self.tokenizer = self.core.tokenizer
        self._ids = itertools.count()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self.core.shutdown()

    def encode(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if not isinstance(prompt, str) else self.tokenizer(prompt)["input_ids"]

    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[GenerationResult]:
        """Run every prompt to completion, as one continuous batch; results in prompt order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        encoded = [self.encode(p) for p in prompts]
        results = {request_id: GenerationResult(prompt_ids, [Completion() for _ in range(p.n)])
                   for request_id, prompt_ids, p in zip(ids, encoded, params_list)}
        try:
            for request_id, prompt_ids, p in zip(ids, encoded, params_list):
                self.core.add_request(request_id, prompt_ids, p)
            while not all(result.is_finished for result in results.values()):
                for output in self.core.step(timeout=1.0):
                    if output.error is not None:
                        raise RequestFailed(f"request {output.request_id}: {output.error.message}")
                    results[output.request_id].add(output)
        except BaseException:
            for request_id in ids:
                self.core.abort(request_id)
            raise
        return [results[request_id] for request_id in ids]
