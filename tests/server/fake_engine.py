"""A deterministic stand-in for the engine, for testing the HTTP layer without model weights (with the
tiny tokenizer of tests/conftest.py).

Greedy output continues a fixed sentence from a point chosen by the prompt; sampled output draws words
from a generator seeded by (seed, choice index). It honours n, max_tokens, min_tokens, stop strings,
stop_token_ids and logprobs, produces prompt logprobs, and can be made slow (`token_delay`, `first_token_delay`), overloaded
(`max_num_requests`) or failing mid-stream (a prompt containing FAIL_MID_STREAM)."""

from __future__ import annotations

import asyncio
import random
import zlib

from hexcore.engine.client import EngineOverloaded, EngineStats, ReplicaStats
from hexcore.outputs import ChoiceDelta, RequestOutput, TokenLogprob
from hexcore.sampling_params import InvalidParameter, SamplingParams

SENTENCE = " the quick brown fox jumps over the lazy dog and runs far away"  # greedy output repeats it
FAIL_MID_STREAM = "FAIL_MID_STREAM"
class FakeEngine:
    def __init__(
        self, tokenizer, model_name: str = "fake-model", max_model_len: int = 256, token_delay: float = 0.0,
        max_num_requests: int = 1000, startup_seconds: float = 0.0, first_token_delay: float = 0.0,
    ):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = len(tokenizer)
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay  # as if queued behind other requests
        self.max_num_requests = max_num_requests
        self.startup_seconds = startup_seconds
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.received: dict[str, tuple[list[int], SamplingParams]] = {}
        self.num_cached_tokens = 0  # what every request reports as found in the prefix cache
        self.script: str | None = None  # when set, greedy requests reply with this text (then eos)
        self._is_ready = False
        self.is_shut_down = False
        self._greedy_ids = self.tokenizer.encode(SENTENCE * 4, add_special_tokens=False)

    @property
    def is_ready(self) -> bool:
        return self._is_ready

    async def start(self) -> None:
        await asyncio.sleep(self.startup_seconds)
        self._is_ready = True

    async def shutdown(self) -> None:
        self.is_shut_down = True
        self._is_ready = False

    def stats(self) -> EngineStats:
        return EngineStats(replicas=[ReplicaStats(
            name="r0", num_running=len(self.running), num_waiting=0, num_kv_blocks_used=len(self.running),
            num_kv_blocks_total=64, num_preemptions=0, num_prompt_tokens=0, num_generated_tokens=0, num_steps=0,
            mean_step_seconds=0.0, stage_busy_fraction=[0.5, 0.25],
        )])

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.running.discard(request_id)
            self.aborted.append(request_id)

    def _next_token(self, prompt: list[int], params: SamplingParams, rng: random.Random, step: int) -> int:
        if params.is_greedy:
            start = zlib.crc32(bytes(str(prompt), "ascii")) % 12
            return self._greedy_ids[(start + step) % len(self._greedy_ids)]
        return rng.choice(self._greedy_ids[:16])

    def _logprob(self, token_id: int, step: int, num_top: int) -> TokenLogprob:
        value = -0.25 - 0.01 * step
        top = {(token_id + k) % 300: value - k for k in range(num_top)}
        return TokenLogprob(token_id=token_id, logprob=value, top=top)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        if len(self.running) >= self.max_num_requests:
            raise EngineOverloaded("the waiting queue is full", retry_after_seconds=2.0)
        if not prompt_token_ids or any(not 0 <= t < len(self.tokenizer) for t in prompt_token_ids):
            raise InvalidParameter("prompt", "the prompt is empty or holds unknown token ids")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidParameter("prompt", "the prompt leaves no room under max_model_len")
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        if len(prompt_token_ids) + max_tokens > self.max_model_len:
            raise InvalidParameter("max_tokens", "prompt plus max_tokens exceeds max_model_len")
        self.received[request_id] = (list(prompt_token_ids), params)
        self.running.add(request_id)
        is_failing = FAIL_MID_STREAM in self.tokenizer.decode(prompt_token_ids)
        script = self.tokenizer.encode(self.script, add_special_tokens=False) if self.script and params.is_greedy else None
        rngs = [random.Random(None if params.seed is None else params.seed * 1000 + i) for i in range(params.n)]
        tokens: list[list[int]] = [[] for _ in range(params.n)]
        texts = [""] * params.n
        done = [False] * params.n
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [self._logprob(t, i, params.prompt_logprobs) for i, t in enumerate(prompt_token_ids[1:])]
        try:
            await asyncio.sleep(self.first_token_delay)
            step = 0
            while not all(done):
                await asyncio.sleep(self.token_delay)
                if request_id not in self.running:
                    return  # aborted
                if is_failing and step == 2:
                    raise RuntimeError("simulated engine fault")
                deltas = []
                for i in range(params.n):
                    if done[i]:
                        continue
                    token = self._next_token(prompt_token_ids, params, rngs[i], step) if script is None else script[step]
                    tokens[i].append(token)
                    full = self.tokenizer.decode(tokens[i], skip_special_tokens=True)
                    finish = "stop" if script is not None and step == len(script) - 1 else None
                    if token in params.stop_token_ids and len(tokens[i]) > params.min_tokens:
                        finish = "stop"
                    for stop in params.stop:
                        if stop in full and len(tokens[i]) > params.min_tokens:
                            full, finish = full[: full.index(stop)], "stop"
                    if finish is None and len(tokens[i]) >= max_tokens:
                        finish = "length"
                    text, texts[i] = full[len(texts[i]):], full
                    logprobs = [self._logprob(token, step, params.logprobs)] if params.logprobs is not None else None
                    deltas.append(ChoiceDelta(index=i, token_ids=[token], text=text, logprobs=logprobs, finish_reason=finish))
                    done[i] = finish is not None
                yield RequestOutput(
                    request_id=request_id, num_prompt_tokens=len(prompt_token_ids), choices=deltas,
                    is_finished=all(done), prompt_logprobs=prompt_logprobs if step == 0 else None, replica="r0",
                    num_cached_tokens=self.num_cached_tokens,
                )
                step += 1
            self.finished.append(request_id)
        finally:
            if request_id in self.running:
                self.running.discard(request_id)
                if not all(done):
                    self.aborted.append(request_id)
