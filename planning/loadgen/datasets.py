"""Benchmark prompts: random prompts of a fixed token length, or prompts read from a JSONL file.

Random prompts are built from token ids through the server's /tokenize and /detokenize when it has
them, so their length is exact in the server's own tokenizer; otherwise from random common words
(about one token each in most tokenizers; the server's usage report gives the true count).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import httpx

_WORDS = (
    "the of and to in is for on that with as was at by from be this have are or an which not but "
    "all were when we there can more if out so what time up about into than them only new some "
    "could these two may first then do any like my now over such our man me even most made after "
    "also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long "
    "get here between both life being under never day same another know while last might great old "
    "year off come since against go came right used take three water light house small river city"
).split()

# how many times the length of a detokenized prompt is re-measured and its ids trimmed or extended
_NUM_LENGTH_FIXES = 4


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    num_prompt_tokens: int | None  # None when unknown until the server reports usage
    num_output_tokens: int


class ServerTokenizer:
    """The server's /tokenize and /detokenize endpoints."""

    def __init__(self, client: httpx.Client, root_url: str):
        self._client = client
        self._root_url = root_url

    @classmethod
    def probe(cls, client: httpx.Client, root_url: str) -> "ServerTokenizer | None":
        """The server's tokenizer if both endpoints answer, else None."""
        tokenizer = cls(client, root_url)
        try:
            ids = tokenizer.encode("hello world")
            tokenizer.decode(ids)
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            return None
        return tokenizer

    def encode(self, text: str) -> list[int]:
        response = self._client.post(
            f"{self._root_url}/tokenize", json={"prompt": text, "add_special_tokens": False}
        )
        response.raise_for_status()
        return [int(token) for token in response.json()["tokens"]]

    def decode(self, ids: list[int]) -> str:
        response = self._client.post(f"{self._root_url}/detokenize", json={"tokens": ids})
        response.raise_for_status()
        return response.json()["prompt"]


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    rng: random.Random,
    tokenizer: ServerTokenizer | None = None,
) -> list[BenchRequest]:
    """`num_prompts` random prompts of `input_len` tokens, each asking for `output_len` tokens."""
    if input_len < 1 or output_len < 1 or num_prompts < 1:
        raise ValueError(
            f"--num-prompts, --input-len and --output-len must be >= 1, "
            f"got {num_prompts}, {input_len}, {output_len}"
        )
    if tokenizer is None:
        return [
            BenchRequest(" ".join(rng.choices(_WORDS, k=input_len)), None, output_len)
            for _ in range(num_prompts)
        ]
    pool = tokenizer.encode(" " + " ".join(_WORDS))
    return [
        BenchRequest(*_exact_length_prompt(tokenizer, rng.choices(pool, k=input_len), input_len), output_len)
        for _ in range(num_prompts)
    ]


def _exact_length_prompt(tokenizer: ServerTokenizer, ids: list[int], input_len: int) -> tuple[str, int]:
    """Detokenize `ids`; re-tokenizing may merge or split tokens, so trim or extend and re-measure."""
    text = tokenizer.decode(ids)
    for _ in range(_NUM_LENGTH_FIXES):
        num_tokens = len(tokenizer.encode(text))
        if num_tokens == input_len:
            break
        excess = num_tokens - input_len
        ids = ids[: max(1, len(ids) - excess)] if excess > 0 else ids + ids[:-excess]
        text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text))


def file_requests(path: str | Path, num_prompts: int, output_len: int) -> list[BenchRequest]:
    """Prompts from a JSONL file of {"prompt": str, "output_len": int (optional)}, cycled to `num_prompts`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset file {str(path)!r} not found")
    entries = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            prompt, num_output = entry["prompt"], int(entry.get("output_len", output_len))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(
                f'{path}:{line_no}: expected a JSON object {{"prompt": str, "output_len": int}}'
            ) from None
        if not isinstance(prompt, str) or num_output < 1:
            raise ValueError(f"{path}:{line_no}: prompt must be a string and output_len >= 1")
        entries.append(BenchRequest(prompt, None, num_output))
    if not entries:
        raise ValueError(f"dataset file {str(path)!r} holds no prompts")
    return [entries[i % len(entries)] for i in range(num_prompts)]
