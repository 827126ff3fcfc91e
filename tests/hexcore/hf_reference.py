"""HF transformers running the same weights unsplit: the reference the distributed engine must match."""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM


@functools.lru_cache(maxsize=4)
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def greedy_reference(model_dir, prompt_ids: list[int], num_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """`num_new_tokens` greedy tokens, through any end-of-sequence token (like ignore_eos), and the
    log-softmax of the logits at every position of prompt + output [P + N, vocab]."""
    model = hf_model(model_dir)
    ids = torch.tensor([prompt_ids])
    past, new_tokens = None, []
    for _ in range(num_new_tokens):
        out = model(ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
        past = out.past_key_values
        new_tokens.append(int(out.logits[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[new_tokens[-1]]])], dim=1)
    logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return new_tokens, logprobs
