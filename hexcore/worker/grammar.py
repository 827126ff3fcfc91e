"""Grammar masks on the worker that samples (the last stage's TP leader).

Compiled grammars are cached by their spec and built on a background thread (llguidance releases the
GIL while it builds), so a step never waits for another request's grammar: a row whose grammar is not
ready within a few milliseconds is *deferred* (no token this step; the engine computes that sequence's
last token again next step and samples then).

Each constrained sequence has a matcher here, keyed by its id. The matcher is a pure function of the
sequence's output tokens, which come with every step: the matcher consumes those it has not seen yet, and
one that has none for the sequence (a new replica after a failover, a worker restarted, an evicted
entry) replays them all. So the mask, and with it seeded sampling, is the same wherever and whenever the
sequence is computed.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hexcore.executor.messages import SeqSampling
from hexcore.grammar import llguidance_grammar
from hexcore.sampling_params import GrammarSpec

logger = logging.getLogger("hexgen.worker")

DEFERRED = "deferred"  # a row whose grammar is still compiling: no token this step
WAIT_SECONDS = 0.005  # how long a step waits for a grammar when other rows share it
WAIT_ALONE_SECONDS = 0.05  # ... when every row of the step waits for one (nobody else is held up)
MAX_GRAMMARS = 256  # compiled grammars kept (least recently used dropped)
MAX_MATCHERS = 2048  # per-sequence matchers kept (least recently used dropped; a dropped one replays)


@dataclass
class _SeqMatcher:
    spec: GrammarSpec
    matcher: object  # llguidance.LLMatcher
    num_consumed: int = 0


class GrammarMatchers:
    """Masks for the constrained rows of each step. Starts loading the tokenizer (about a second) in the
    background at once, so the first constrained request does not wait for it."""

    def __init__(self, model_dir: Path, vocab_size: int):
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hexgen-grammar")
        self._tokenizer: Future = self._pool.submit(self._load_tokenizer, Path(model_dir), vocab_size)
        self._compiled: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._matchers: OrderedDict[int, _SeqMatcher] = OrderedDict()
        self._words = (vocab_size + 31) // 32
        self.num_deferred = 0  # rows deferred since start (their grammar was compiling)

    @staticmethod
    def _load_tokenizer(model_dir: Path, vocab_size: int):
        import llguidance.hf
        from transformers import AutoTokenizer

        return llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(model_dir), n_vocab=vocab_size)

    def _compile(self, spec: GrammarSpec):
        """The spec's matcher in its start state, with its first mask computed (that warms the lexer that
        every copy shares). A grammar that does not compile (the HTTP edge refuses those) gives a matcher
        in its error state, or None."""
        from llguidance import LLMatcher

        started = time.perf_counter()
        try:
            grammar = llguidance_grammar(spec)
        except (ValueError, TypeError) as err:
            logger.warning("grammar %s is malformed: %s", spec.kind, err)
            return None
        matcher = LLMatcher(self._tokenizer.result(), grammar, log_level=0)
        if matcher.is_error():
            logger.warning("grammar %s does not compile: %s", spec.kind, matcher.get_error())
        else:
            matcher.compute_bitmask()
        logger.debug("compiled a %s grammar in %.1f ms", spec.kind, 1e3 * (time.perf_counter() - started))
        return matcher

    def compiled(self, spec: GrammarSpec) -> Future:
        future = self._compiled.get(spec)
        if future is None:
            future = self._compiled[spec] = self._pool.submit(self._compile, spec)
            while len(self._compiled) > MAX_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(spec)
        return future

    def allowed(self, specs: list[SeqSampling]) -> list[torch.Tensor | str | None]:
        """Per row: None (no grammar), DEFERRED, or a bool tensor [vocab] of the tokens it may sample."""
        futures = [self.compiled(spec.params.grammar) if spec.params.grammar is not None else None for spec in specs]
        pending = [f for f in futures if f is not None and not f.done()]
        if pending:
            alone = all(f is None or not f.done() for f in futures)
            deadline = time.monotonic() + (WAIT_ALONE_SECONDS if alone else WAIT_SECONDS)
            for future in pending:
                try:
                    future.result(timeout=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    break
        masks: list[torch.Tensor | str | None] = []
        for spec, future in zip(specs, futures):
            if future is None:
                masks.append(None)
            elif not future.done():
                self.num_deferred += 1
                masks.append(DEFERRED)
            else:
                masks.append(self._mask(spec, future.result()))
        return masks

    def _matcher(self, spec: SeqSampling, template) -> _SeqMatcher | None:
        if template is None:
            return None
        state = self._matchers.get(spec.seq_id)
        outputs = spec.output_token_ids
        if state is None or state.spec != spec.params.grammar or state.num_consumed > len(outputs):
            state = self._matchers[spec.seq_id] = _SeqMatcher(spec.params.grammar, template.deep_copy())
            while len(self._matchers) > MAX_MATCHERS:
                self._matchers.popitem(last=False)
        else:
            self._matchers.move_to_end(spec.seq_id)
        if state.num_consumed < len(outputs):
            new = list(outputs[state.num_consumed:])
            if not state.matcher.is_error() and not state.matcher.consume_tokens(new):
                logger.warning("sequence %d left its grammar: %s", spec.seq_id, state.matcher.get_error())
            state.num_consumed = len(outputs)
        return state

    def _mask(self, spec: SeqSampling, template) -> torch.Tensor:
        state = self._matcher(spec, template)
        matcher = state.matcher if state is not None else None
        if matcher is None or matcher.is_error():  # cannot happen with tokens it allowed; end the sequence rather than guess
            allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
            allowed[list(self._tokenizer.result().eos_tokens)] = True
            return allowed
        words = np.empty(self._words, dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)  # a stopped matcher allows only EOS
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.astype(np.bool_))

    def forget(self, seq_id: int) -> None:
        self._matchers.pop(seq_id, None)
