"""Checks at the HTTP edge that depend on the model and the deployment: every value that reaches the
engine must be one it can serve, so no request can crash a worker, and no request can make the server
tokenize more text than could ever fit in the context. A bad value is a 400 naming the parameter.

Static bounds (n >= 1, logprobs in [0, 20], finite floats, int64 seeds...) are declared on the
request models in server/protocol.py, so they are also published in the OpenAPI schema."""

from __future__ import annotations

from hexcore.engine.client import EngineClient
from hexcore.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from server.errors import bad_request
from server.protocol import SamplingRequest

# OpenAI allows 4 stop sequences; ours are lenient, but bounded (each is matched after every token):
# MAX_STOP_STRINGS of at most MAX_STOP_STRING_CHARS (hexcore/sampling_params.py checks them too).
MAX_STOP_TOKEN_IDS = 1024


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    """Every id in [0, vocab_size): anything else would index past the model's embedding or logits."""
    if token_ids and not (0 <= min(token_ids) and max(token_ids) < vocab_size):
        bad = next(token_id for token_id in token_ids if not 0 <= token_id < vocab_size)
        raise bad_request(f"token id {bad} in {param!r} is out of range: token ids must be in [0, {vocab_size})", param)


class EdgeLimits:
    """The limits of one served model. `max_text_chars` needs the tokenizer, so it is computed on first
    use (once the engine is ready) and kept."""

    def __init__(self, engine: EngineClient, max_n: int):
        self.engine = engine
        self.max_n = max_n
        self._longest_token_chars: int | None = None

    @property
    def longest_token_chars(self) -> int:
        """The most characters one token of the vocabulary stands for. Vocabulary entries spell their
        text with at least one character per character (byte-level BPE: one per byte), so a text of L
        characters needs at least L / longest_token_chars tokens."""
        if self._longest_token_chars is None:
            vocab = self.engine.tokenizer.get_vocab()
            self._longest_token_chars = max((len(token) for token in vocab), default=1) or 1
        return self._longest_token_chars

    @property
    def max_text_chars(self) -> int:
        """A text longer than this cannot fit in max_model_len tokens: refused without tokenizing it."""
        return self.engine.max_model_len * self.longest_token_chars

    def check_text_length(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_text_chars:
            raise bad_request(
                f"{param!r} is too long: {num_chars} characters cannot fit in max_model_len "
                f"({self.engine.max_model_len}) tokens", param,
            )

    def check_prompt_ids(self, prompts: list[list[int]], param: str) -> None:
        for ids in prompts:
            check_token_ids(ids, self.engine.vocab_size, param)

    def check_sampling(self, request: SamplingRequest, max_tokens: int | None) -> None:
        """What SamplingParams cannot know: n against server.max_n, stop lists, stop_token_ids against
        the vocabulary, min_tokens against the context."""
        if request.n > self.max_n:
            raise bad_request(f"n must be at most {self.max_n} on this server (got {request.n})", "n")
        stops = request.stop_strings
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings (got {len(stops)})", "stop")
        for stop in stops:
            if not 1 <= len(stop) <= MAX_STOP_STRING_CHARS:
                raise bad_request(f"each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters", "stop")
        if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad_request(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids (got {len(request.stop_token_ids)})",
                              "stop_token_ids")
        check_token_ids(request.stop_token_ids, self.engine.vocab_size, "stop_token_ids")
        limit = max_tokens if max_tokens is not None else self.engine.max_model_len - 1
        if request.min_tokens > limit:
            what = "max_tokens" if max_tokens is not None else "max_model_len - 1"
            raise bad_request(f"min_tokens ({request.min_tokens}) must not exceed {what} ({limit})", "min_tokens")
