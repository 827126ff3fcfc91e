"""Choose each sequence's next token from its logits, on the stage that scores the step.

Rows are processed independently of one another, so a request gets the same token whatever else
shares its batch. Random draws are stateless: output token i of a request with seed s uses a
generator seeded from (s, i), which makes seeded requests reproducible across batches, restarts and
preemptions.
"""

from __future__ import annotations

import torch

from hexcore.executor.messages import SeqSampling
from hexcore.outputs import TokenLogprob

_SEED_STRIDE = 1_000_003


def draw_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _SEED_STRIDE + index) % (2**63))


def apply_penalties(logits: torch.Tensor, spec: SeqSampling) -> torch.Tensor:
    """logits [V]: OpenAI presence/frequency penalties over the output so far, then the
    multiplicative repetition penalty over prompt and output."""
    params = spec.params
    if params.presence_penalty or params.frequency_penalty:
        counts = torch.bincount(torch.tensor(spec.output_token_ids, dtype=torch.long), minlength=logits.numel())
        counts = counts[: logits.numel()].to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(spec.prompt_token_ids) | set(spec.output_token_ids)), dtype=torch.long)
        if seen.numel():
            picked = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """logits [V] with everything outside top-k, the top-p nucleus and the min-p floor set to -inf."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        outside = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keeps the token crossing top_p
        logits = logits.clone()
        logits[order[outside]] = float("-inf")
    return logits


def apply_logit_bias(logits: torch.Tensor, logit_bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """OpenAI logit_bias: each value added to its token's logit (ids past the logits are ignored)."""
    logits = logits.clone()
    for token_id, bias in logit_bias:
        if token_id < logits.numel():
            logits[token_id] += bias
    return logits


def apply_grammar(logits: torch.Tensor, raw_logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Only the tokens the grammar allows. Should the bans have removed all of them (eos banned by
    min_tokens when the grammar can only end), the grammar wins over the bans."""
    masked = logits.masked_fill(~allowed, float("-inf"))
    if not bool(torch.isfinite(masked).any()):
        masked = raw_logits.masked_fill(~allowed, float("-inf"))
    return masked


def sample_one(logits: torch.Tensor, spec: SeqSampling, allowed: torch.Tensor | None = None) -> TokenLogprob:
    """logits [V] float32 -> the chosen token, with its raw log-probability and top alternatives.
    `allowed` [V] bool: the grammar's mask, applied after bans, bias and penalties and before
    temperature, top-k, top-p and min-p."""
    params = spec.params
    raw_logits = logits
    if spec.banned_token_ids:
        logits = logits.clone()
        logits[list(spec.banned_token_ids)] = float("-inf")
    if params.logit_bias:
        logits = apply_logit_bias(logits, params.logit_bias)
    if params.has_penalties:
        logits = apply_penalties(logits, spec)
    if allowed is not None:
        logits = apply_grammar(logits, raw_logits, allowed)
    if params.is_greedy:
        token_id = int(torch.argmax(logits))
    else:
        logits = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=draw_generator(spec.seed, spec.num_generated))
        token_id = int(torch.argmax(probs / noise))  # exponential race: P(token) = probs[token]
    if params.logprobs is None:
        return TokenLogprob(token_id, 0.0)
    return scored_token(torch.log_softmax(raw_logits, dim=-1), token_id, params.logprobs)


def scored_token(logprobs: torch.Tensor, token_id: int, num_top: int) -> TokenLogprob:
    """logprobs [V] -> the token's log-probability and the `num_top` most likely alternatives."""
    top = {}
    if num_top:
        values, ids = torch.topk(logprobs, num_top)
        top = dict(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id, float(logprobs[token_id]), top)


def is_plain_greedy(spec: SeqSampling, grammar: bool = True) -> bool:
    """The row's token is its logits' argmax: greedy, nothing banned, biased, penalised or (unless
    `grammar` is False) constrained, no logprobs."""
    params = spec.params
    return (params.is_greedy and not spec.banned_token_ids and not params.has_penalties and params.logprobs is None
            and not params.logit_bias and (params.grammar is None or not grammar))


def sample(logits: torch.Tensor, specs: list[SeqSampling],
           allowed: list[torch.Tensor | None] | None = None) -> list[TokenLogprob]:
    """logits [N, V] float32, one row per spec; `allowed`: per row, its grammar's mask or None. Plain
    greedy rows share one argmax over the batch (the same token as their own argmax: one op instead of
    one per row)."""
    allowed = allowed or [None] * len(specs)
    tokens: list[TokenLogprob | None] = [None] * len(specs)
    if any(is_plain_greedy(spec) for spec in specs):
        for i, token_id in enumerate(logits.argmax(dim=-1).tolist()):
            tokens[i] = TokenLogprob(token_id, 0.0) if is_plain_greedy(specs[i]) else None
    # greedy rows constrained by a grammar and nothing else: one masked argmax over all of them
    masked = [i for i, spec in enumerate(specs) if allowed[i] is not None and is_plain_greedy(spec, grammar=False)]
    if masked:
        rows = logits[masked].masked_fill(~torch.stack([allowed[i] for i in masked]), float("-inf"))
        for i, token_id in zip(masked, rows.argmax(dim=-1).tolist()):
            tokens[i] = TokenLogprob(token_id, 0.0)
    return [token if token is not None else sample_one(row, spec, allowed[i])
            for i, (token, row, spec) in enumerate(zip(tokens, logits, specs))]
