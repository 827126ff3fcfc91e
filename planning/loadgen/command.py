"""`hexgen bench serve`: an open-loop load generator for any OpenAI-compatible completions server.

Requests leave on a Poisson schedule (exponential gaps of mean 1/rate; rate inf sends all at once),
optionally capped at a number in flight, after one untimed warm-up request. Prints and saves the
serving metrics defined in planning/loadgen/metrics.py.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from planning.loadgen.client import stream_completion
from planning.loadgen.datasets import BenchRequest, ServerTokenizer, file_requests, random_requests
from planning.loadgen.metrics import BenchmarkSummary, RequestRecord, Slo, summarize

_TIMEOUT = httpx.Timeout(connect=10.0, read=3600.0, write=60.0, pool=3600.0)


def arrival_offsets(num_requests: int, request_rate: float, rng: random.Random) -> list[float]:
    """Send times in seconds from the start: the first at 0, then exponential gaps of mean 1/rate."""
    if request_rate <= 0:
        raise ValueError(f"--request-rate must be positive or inf, got {request_rate}")
    offsets, now = [], 0.0
    for _ in range(num_requests):
        offsets.append(now)
        now += 0.0 if math.isinf(request_rate) else rng.expovariate(request_rate)
    return offsets


def root_url(base_url: str) -> str:
    """The server root: `http://h:p`, `http://h:p/` and `http://h:p/v1` all name the same server."""
    return base_url.rstrip("/").removesuffix("/v1")


async def run_load(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    offsets: list[float],
    max_concurrency: int | None = None,
    show_progress: bool = True,
) -> tuple[list[RequestRecord], float]:
    """Warm up, then send `requests[i]` at `offsets[i]`; return their records and the wall time."""
    assert len(requests) == len(offsets)
    url = f"{root_url(base_url)}/v1/completions"
    limits = httpx.Limits(max_connections=max_concurrency or len(requests) + 1, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=_TIMEOUT, limits=limits) as client:
        is_ignore_eos = await _warm_up(client, url, model, requests[0])
        in_flight = asyncio.Semaphore(max_concurrency or len(requests))
        progress = tqdm(total=len(requests), desc="requests", disable=not show_progress)
        start = time.perf_counter()

        async def send(request: BenchRequest, offset: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, offset - (time.perf_counter() - start)))
            async with in_flight:
                record = await stream_completion(client, url, model, request, is_ignore_eos)
            progress.update(1)
            return record

        records = await asyncio.gather(*(send(r, o) for r, o in zip(requests, offsets)))
        duration = time.perf_counter() - start
        progress.close()
    return list(records), duration


async def _warm_up(client: httpx.AsyncClient, url: str, model: str, request: BenchRequest) -> bool:
    """Send one untimed request; return whether the server accepts `ignore_eos`."""
    record = await stream_completion(client, url, model, request, is_ignore_eos=True)
    if record.is_success:
        return True
    if "ignore_eos" in record.error:  # a strict server rejecting the extension: run without it
        record = await stream_completion(client, url, model, request, is_ignore_eos=False)
        if record.is_success:
            return False
    raise ValueError(f"warm-up request to {url} failed: {record.error}")


def load_requests(args: argparse.Namespace, client: httpx.Client) -> list[BenchRequest]:
    if args.dataset == "file":
        if not args.dataset_path:
            raise ValueError("--dataset file needs --dataset-path")
        return file_requests(args.dataset_path, args.num_prompts, args.output_len)
    tokenizer = ServerTokenizer.probe(client, root_url(args.base_url))
    return random_requests(
        args.num_prompts, args.input_len, args.output_len, random.Random(args.seed), tokenizer
    )


def default_model(client: httpx.Client, base_url: str) -> str:
    """The first model the server lists under /v1/models."""
    try:
        response = client.get(f"{root_url(base_url)}/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
        raise ValueError(f"no --model given and {base_url}/v1/models did not name one: {err}") from None


def format_summary(summary: BenchmarkSummary) -> str:
    rows = [
        ("Successful requests", f"{summary.num_completed}"),
        ("Failed requests", f"{summary.num_failed}"),
        ("Benchmark duration (s)", f"{summary.duration_s:.2f}"),
        ("Total input tokens", f"{summary.total_input_tokens}"),
        ("Total output tokens", f"{summary.total_output_tokens}"),
        ("Request throughput (req/s)", f"{summary.request_throughput:.3f}"),
        ("Output token throughput (tok/s)", f"{summary.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{summary.total_token_throughput:.2f}"),
    ]
    if summary.goodput is not None:
        rows.append((f"Goodput (req/s, {_format_slo(summary.slo)})", f"{summary.goodput:.3f}"))
    for name, stats in (("TTFT", summary.ttft), ("TPOT", summary.tpot), ("ITL", summary.itl), ("E2E", summary.e2e)):
        rows += [
            (f"Mean {name} (ms)", f"{stats.mean_ms:.2f}"),
            (f"Median {name} (ms)", f"{stats.median_ms:.2f}"),
            (f"P90 {name} (ms)", f"{stats.p90_ms:.2f}"),
            (f"P99 {name} (ms)", f"{stats.p99_ms:.2f}"),
        ]
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value:>12}" for label, value in rows)


def _format_slo(slo: Slo) -> str:
    limits = (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms))
    return ", ".join(f"{name}<={ms:g}ms" for name, ms in limits if ms is not None)


def run(args: argparse.Namespace) -> int:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    with httpx.Client(timeout=60.0) as client:
        model = args.model or default_model(client, args.base_url)
        requests = load_requests(args, client)
    offsets = arrival_offsets(len(requests), args.request_rate, random.Random(args.seed))
    records, duration = asyncio.run(
        run_load(args.base_url, model, requests, offsets, args.max_concurrency)
    )
    summary = summarize(records, duration, Slo(args.slo_ttft, args.slo_tpot))
    print(format_summary(summary))
    for error in sorted({r.error for r in records if not r.is_success})[:5]:
        print(f"failure: {error}")
    if args.json:
        report = {
            "config": {k: v for k, v in vars(args).items() if k != "func"} | {"model": model},
            "summary": dataclasses.asdict(summary),
            "requests": [dataclasses.asdict(r) | {"tpot": r.tpot} for r in records],
        }
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"saved {args.json}")
    return 0 if summary.num_completed else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    parser = bench_commands.add_parser("serve", help="load-test an OpenAI-compatible server", description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, with or without /v1")
    parser.add_argument("--model", default=None, help="model name to request (default: first of /v1/models)")
    parser.add_argument("--dataset", choices=("random", "file"), default="random")
    parser.add_argument("--dataset-path", default=None, help='JSONL of {"prompt": str, "output_len": int}')
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (random dataset; default 128)")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument("--num-prompts", type=int, default=64, help="default 64")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrival rate in requests/s, or inf (default)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    parser.add_argument("--slo-ttft", type=float, default=None, metavar="MS", help="TTFT SLO for goodput")
    parser.add_argument("--slo-tpot", type=float, default=None, metavar="MS", help="TPOT SLO for goodput")
    parser.add_argument("--json", default=None, metavar="FILE", help="save config, summary and per-request records")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)

