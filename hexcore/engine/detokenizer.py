"""Incremental detokenization and stop strings for one sequence.

Text is decoded from a sliding window of tokens so that multi-token characters come out whole: the
window's tail is emitted only once it no longer ends in an incomplete character. Stop strings are
searched in the text as it grows; the last (longest stop - 1) characters are held back until they
cannot begin a stop string, so a stop split across tokens is still caught and never returned.
"""

from __future__ import annotations

_INCOMPLETE = "\ufffd"
_WINDOW = 6  # tokens of context before the new ones, enough for any merge across a token boundary


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far (complete characters)
        self._num_emitted = 0  # characters of `text` already returned
        self._prefix_start = 0  # window: token_ids[_prefix_start:_read_start] is context only
        self._read_start = 0
        self._hold_back = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int) -> str | None:
        """Add a token; returns the matched stop string if the text now contains one."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self._prefix_start : self._read_start])
        full = self._decode(self.token_ids[self._prefix_start :])
        if len(full) > len(prefix) and not full.endswith(_INCOMPLETE):
            search_from = max(0, len(self.text) - self._hold_back)
            self.text += full[len(prefix) :]
            self._prefix_start = max(0, len(self.token_ids) - _WINDOW)
            self._read_start = len(self.token_ids)
            return self._find_stop(search_from)
        return None

    def _find_stop(self, search_from: int) -> str | None:
        hits = [(self.text.find(s, search_from), s) for s in self.stop]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            return None
        at, stop = min(hits)
        self.text = self.text[:at]
        return stop

    def take_new_text(self, is_final: bool) -> str:
        """Text not yet returned, minus what might still turn out to start a stop string."""
        end = len(self.text) if is_final else max(self._num_emitted, len(self.text) - self._hold_back)
        new = self.text[self._num_emitted : end]
        self._num_emitted = end
        return new
