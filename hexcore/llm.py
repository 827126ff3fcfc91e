"""The offline API: `LLM(config).generate(prompts, params)` starts the workers, runs a batch of
prompts through the engine, and stops the workers (also on an exception or Ctrl-C)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hexcore.config import DeploymentConfig
from hexcore.deployment import resolve
from hexcore.engine_core import EngineCore
from hexcore.outputs import TokenLogprob
from hexcore.sampling_params import SamplingParams


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None


@dataclass(frozen=True)
class GenerationResult:
    prompt_token_ids: list[int]
    completions: list[Completion]  # one per choice (n)
    prompt_logprobs: list[TokenLogprob | None] | None
    replica: str

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids

    @property
    def text(self) -> str:
        return self.completions[0].text


class LLM:
    def __init__(self, config: DeploymentConfig):
        from transformers import AutoTokenizer

        self.deployment = resolve(config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.deployment.model_dir)
        self.core = EngineCore(self.deployment, self.tokenizer)
        self.core.start()
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
        for request_id, prompt_ids, p in zip(ids, encoded, params_list):
            self.core.add_request(request_id, prompt_ids, p)
        collected = {request_id: {} for request_id in ids}
        prompt_logprobs, replicas = {}, {}
        try:
            while any(len(collected[r]) < p.n or not all(c["finish"] for c in collected[r].values())
                      for r, p in zip(ids, params_list)):
                for output in self.core.step(timeout=1.0):
                    replicas[output.request_id] = output.replica
                    if output.prompt_logprobs is not None:
                        prompt_logprobs[output.request_id] = output.prompt_logprobs
                    for delta in output.choices:
                        choice = collected[output.request_id].setdefault(
                            delta.index, {"ids": [], "text": "", "logprobs": [], "finish": None})
                        choice["ids"] += delta.token_ids
                        choice["text"] += delta.text
                        choice["logprobs"] += delta.logprobs or []
                        choice["finish"] = delta.finish_reason
        except BaseException:
            for request_id in ids:
                self.core.abort(request_id)
            raise
        return [GenerationResult(prompt_ids,
                                 [Completion(c["ids"], c["text"], c["finish"], c["logprobs"] if p.logprobs is not None else None)
                                  for _, c in sorted(collected[r].items())],
                                 prompt_logprobs.get(r), replicas.get(r, ""))
                for r, prompt_ids, p in zip(ids, encoded, params_list)]
