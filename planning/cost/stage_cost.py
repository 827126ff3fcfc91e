"""The cost model: time of one pipeline-stage step and memory of one device, as pure functions.

A step processes `num_tokens` new tokens for the sequences of one (micro-)batch. What it costs on a
stage of `tp` devices holding `layers` consecutive layers, per device (the slowest device of a TP
group sets the pace, so a group is described by its slowest figures):

    flops per layer   = (2 * P * num_tokens + 4 * H * attended_pairs) / tp
    bytes per layer   = (P * B * passes + kv_bytes_per_token * kv_read_tokens) / tp
                        passes = 1 for one token, gemm_weight_passes for more (see below)
    layer time        = max(flops / compute, bytes / mem_bandwidth)            (roofline)
                        + 2 * allreduce(num_tokens * H * B)                     (attention and MLP outputs)
                        + overhead_per_layer + overhead_per_kv_token * kv_read_tokens / tp
    step time         = layers * layer time + overhead_per_step
                        + on the last stage, the LM head: max(2*H*V*num_sampled / tp / compute,
                                                              V*H*B / tp / mem_bandwidth)

A CPU worker is a roofline too: hexcore's linear layers prefetch the next block of weights while they
multiply by the current one (hexcore/kernels/panel_linear.py), so streaming and computing overlap. On this
project's 2-core machine the engine's stage at 1-4 decoding sequences takes the time of its weight
stream, at 16 or a prefill that of its arithmetic (adding the two terms, as the model did for the
kernels before, fitted worse; figures: BENCHMARKS.md, Calibration). That is shown for float32 on the
compiled loop; a CPU worker without it (oneDNN's kernels, other dtypes) is modelled the same way,
untested. The per-KV-token overhead is the paged attention's gather beyond the raw KV bytes.
`gemm_weight_passes` (default 1, set by hand) is for devices whose multi-token GEMMs stream the
weights more than once. Calibration fits the effective compute and
the three overheads to the engine's own stage (planning/calibrate/engine.py); GPUs keep the defaults
(no overheads).

P = parameters of one layer (ModelSpec.params_per_layer: Q/O, K/V sized by KV heads, gated MLP of the
model's intermediate size), H = hidden size, B = bytes per element, V = vocabulary size.
`attended_pairs` = over the new tokens, the number of (query, key) pairs attention computes (QK^T and
AV cost 2 * H flops each per pair); `kv_read_tokens` = over the batch's sequences, the cached tokens
attention reads (each sequence's cache is read once per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from planning.inputs.catalog import DeviceSpec, LinkSpec
from planning.inputs.models import ModelSpec

# Share of device memory usable for weights, KV cache and activations (runtime context, allocator slack).
USABLE_MEMORY_FRACTION = 0.9


def allreduce_time(num_bytes: float, tp: int, link: LinkSpec) -> float:
    """Ring all-reduce, alpha-beta model: 2*(t-1) steps each moving bytes/t over the slowest link,
    2*(t-1) * (alpha + bytes / (t * beta)). A measured all-reduce latency (LinkSpec.allreduce_latency_s)
    replaces 2*(t-1)*alpha."""
    if tp == 1:
        return 0.0
    steps = 2 * (tp - 1)
    measured = link.allreduce_latency_s(tp)
    latency = measured if measured is not None else steps * link.latency_s
    return latency + steps * num_bytes / (tp * link.bytes_per_second)


def p2p_time(num_bytes: float, link: LinkSpec) -> float:
    """One message between two devices: alpha + bytes / beta."""
    return link.latency_s + num_bytes / link.bytes_per_second


def activation_send_time(model: ModelSpec, num_tokens: int, link: LinkSpec) -> float:
    """PP transfer of the hidden states of `num_tokens` tokens to the next stage's leader."""
    return p2p_time(num_tokens * model.hidden_size * model.dtype_bytes, link)


def slowest(devices: list[DeviceSpec]) -> DeviceSpec:
    """The pace-setting figures of a TP group: lowest memory, compute and bandwidth, highest overheads."""
    return DeviceSpec(
        memory_gb=min(d.memory_gb for d in devices),
        tflops=min(d.tflops for d in devices),
        mem_bandwidth_gbs=min(d.mem_bandwidth_gbs for d in devices),
        kind=devices[0].kind,
        overhead_ms_per_layer=max(d.overhead_ms_per_layer for d in devices),
        overhead_ms_per_step=max(d.overhead_ms_per_step for d in devices),
        overhead_us_per_kv_token=max(d.overhead_us_per_kv_token for d in devices),
        gemm_weight_passes=max(d.gemm_weight_passes for d in devices),
    )


@dataclass(frozen=True)
class StageCost:
    """Step-time model of one stage (its TP group and position), independent of its layer count."""

    model: ModelSpec
    device: DeviceSpec  # the slowest figures of the group
    tp: int
    tp_link: LinkSpec
    is_first: bool
    is_last: bool

    def layer_time(self, num_tokens: float, attended_pairs: float, kv_read_tokens: float) -> float:
        c = self._coefficients
        weights = c[2] if num_tokens <= 1 else c[2] * c[7]
        flops, memory = num_tokens * c[0] + attended_pairs * c[1], weights + kv_read_tokens * c[3]
        return max(flops, memory) + c[4] + num_tokens * c[5] + kv_read_tokens * c[6]

    @cached_property
    def _coefficients(self) -> tuple[float, ...]:
        """The formulas above as seconds per unit (the simulator calls layer_time millions of times):
        flops per token and per attended pair, bytes fixed and per KV token (each over the device's
        rate), then the all-reduce pair's fixed part (plus the per-layer overhead) and per-token part,
        the attention overhead per KV token read, and the weight passes of a multi-token step."""
        m, d, tp = self.model, self.device, self.tp
        token_bytes = m.hidden_size * m.dtype_bytes
        allreduce_fixed = 2 * allreduce_time(0.0, tp, self.tp_link)
        allreduce_per_token = 2 * allreduce_time(token_bytes, tp, self.tp_link) - allreduce_fixed
        return (
            2 * m.params_per_layer / tp / d.flops,
            4 * m.hidden_size / tp / d.flops,
            m.layer_bytes / tp / d.bandwidth_bytes,
            m.kv_bytes_per_token_per_layer / tp / d.bandwidth_bytes,
            allreduce_fixed + d.overhead_ms_per_layer / 1e3,
            allreduce_per_token,
            d.overhead_us_per_kv_token / 1e6 / tp,
            d.gemm_weight_passes,
        )

    def fixed_time(self, num_sampled: float) -> float:
        """Per-step cost that does not scale with layers: overhead, and the LM head on the last stage."""
        overhead, head_per_sample, head_bytes = self._fixed_coefficients
        if head_bytes and num_sampled > 0:
            flops = num_sampled * head_per_sample
            if num_sampled > 1:
                head_bytes *= self.device.gemm_weight_passes
            return overhead + max(flops, head_bytes)
        return overhead

    @cached_property
    def _fixed_coefficients(self) -> tuple[float, float, float]:
        """Step overhead; LM head seconds per sampled token (flops) and for its weight scan (bytes)."""
        m, d = self.model, self.device
        if not self.is_last:
            return d.overhead_ms_per_step / 1e3, 0.0, 0.0
        head_flops = 2 * m.hidden_size * m.vocab_size / self.tp
        head_bytes = m.embedding_params * m.dtype_bytes / self.tp
        return d.overhead_ms_per_step / 1e3, head_flops / d.flops, head_bytes / d.bandwidth_bytes

    def step_time(
        self, layers: int, num_tokens: float, attended_pairs: float, kv_read_tokens: float, num_sampled: float
    ) -> float:
        return layers * self.layer_time(num_tokens, attended_pairs, kv_read_tokens) + self.fixed_time(num_sampled)

    def prefill_time(self, layers: int, prompt_len: int, batch_size: int = 1) -> float:
        """One step prefilling `batch_size` prompts of `prompt_len` tokens from an empty cache."""
        pairs = batch_size * prompt_len * (prompt_len + 1) / 2
        tokens = batch_size * prompt_len
        return self.step_time(layers, tokens, pairs, tokens, batch_size)

    def decode_time(self, layers: int, batch_size: int, context_len: int) -> float:
        """One decode step of `batch_size` sequences, each with `context_len` cached tokens."""
        kv = batch_size * (context_len + 1)
        return self.step_time(layers, batch_size, kv, kv, batch_size)


def weight_bytes_per_device(model: ModelSpec, tp: int, layers: int, is_first: bool, is_last: bool) -> float:
    """Weight shard: the stage's layers, plus the embedding (first stage) and LM head (last stage)."""
    embedding = model.embedding_params * model.dtype_bytes
    total = layers * model.layer_bytes
    if is_first:
        total += embedding
    if is_last and not (model.is_tied_embeddings and is_first):
        total += embedding
    return total / tp


def workspace_bytes_per_device(model: ModelSpec, tp: int, max_batched_tokens: int, max_num_seqs: int, is_last: bool) -> float:
    """Activation workspace of the largest step: hidden/residual/attention outputs (4H per token),
    the MLP's gate and up projections (2I/tp per token), and fp32 logits on the last stage."""
    per_token = 4 * model.hidden_size + 2 * model.intermediate_size / tp
    total = max_batched_tokens * per_token * model.dtype_bytes
    if is_last:
        total += max_num_seqs * model.vocab_size * 4 / tp
    return total


def kv_bytes_per_token_per_device(model: ModelSpec, tp: int, layers: int) -> float:
    """KV cache of one token on one device: the stage's layers, this device's share of the KV heads."""
    return layers * model.kv_bytes_per_token_per_layer / tp


def kv_capacity_tokens(
    model: ModelSpec, device: DeviceSpec, tp: int, layers: int, is_first: bool, is_last: bool,
    max_batched_tokens: int, max_num_seqs: int,
) -> int:
    """Tokens of KV cache that fit beside weights and workspace in the usable memory (negative: no fit)."""
    free = (
        device.memory_bytes * USABLE_MEMORY_FRACTION
        - weight_bytes_per_device(model, tp, layers, is_first, is_last)
        - workspace_bytes_per_device(model, tp, max_batched_tokens, max_num_seqs, is_last)
    )
    return int(free // kv_bytes_per_token_per_device(model, tp, layers))
