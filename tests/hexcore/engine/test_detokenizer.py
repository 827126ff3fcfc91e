"""Incremental detokenization: the streamed pieces add up to the full decode; stop strings that span
tokens are caught, cut, and never streamed."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from hexcore.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def stream(tokenizer, text: str, stop=()) -> tuple[str, str | None]:
    detokenizer = IncrementalDetokenizer(tokenizer, tuple(stop))
    streamed, matched = "", None
    for token_id in tokenizer(text)["input_ids"]:
        matched = detokenizer.append(token_id)
        streamed += detokenizer.take_new_text(is_final=matched is not None)
        if matched:
            break
    else:
        streamed += detokenizer.take_new_text(is_final=True)
    return streamed, matched


def test_pieces_add_up_to_the_whole_text_including_multibyte_characters(tokenizer):
    text = "Hello world, café naïve 日本 🙂 done."
    assert stream(tokenizer, text) == (text, None)


def test_stop_string_spanning_tokens_is_cut(tokenizer):
    text = "The capital of France is Paris. The capital of Italy is Rome."
    ids = tokenizer(text)["input_ids"]
    assert len(ids) < len(text)  # merged tokens: "is Par" spans a boundary
    assert stream(tokenizer, text, stop=["is Par"]) == ("The capital of France ", "is Par")
    assert stream(tokenizer, text, stop=["Rome", "Paris"]) == ("The capital of France is ", "Paris")


def test_nothing_of_a_possible_stop_prefix_is_streamed_early(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, ("xyz!",))
    streamed = ""
    for token_id in tokenizer("abc xy")["input_ids"]:
        assert detokenizer.append(token_id) is None
        streamed += detokenizer.take_new_text(is_final=False)
    assert streamed == "abc"  # " xy" is held back: it might still become the stop string
