"""The entry point of a worker process: one per device. It joins its replica's torch.distributed
world, creates every stage's TP group (identically on all ranks), loads only its own shard, reports
how many KV blocks its host's budget leaves room for, allocates the count the driver chooses for the
replica, reports ready, then runs the steps the driver sends until told to stop."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from hexcore.config import Device
from hexcore.hardware import check_available, gloo_interface, kv_cache_budget_bytes, torch_device
from hexcore.executor.rendezvous import join_store
from hexcore.executor.messages import (AllocateKVCache, Shutdown, StatsRequest, StepMessage, WorkerFailed,
                                       WorkerLoaded, WorkerReady)
from hexcore.executor.specs import WorkerSpec
from hexcore.model.files import resolve_model_dir
from hexcore.model.parallel import TPGroup
from hexcore.worker.seq_state import SeqStates
from hexcore.worker.stage_runner import StageRunner, load_stage_runner

_STARTUP_TIMEOUT = timedelta(minutes=5)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the driver dies, so no worker is ever orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _name_process(name: str) -> None:
    """What ps, top and /proc/PID/comm show (15 characters), so an operator can tell the workers apart."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _keep_freed_memory() -> None:
    """Let glibc reuse freed memory for large tensors instead of returning it to the OS: otherwise
    every step's big temporaries are fresh mmaps that page-fault in again."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _load_runner(spec: WorkerSpec) -> StageRunner:
    """Start-up, phase one: join the replica's world and load this rank's weights, on this host's terms
    (its model files, its cores); the KV cache comes once the replica's block count is known."""
    device = Device.parse(spec.device)
    check_available(device)
    budget = spec.host_budget
    assert budget is not None, "whoever starts a worker sets its host's budget"
    torch.set_num_threads(spec.num_threads or budget.num_threads(spec.num_local_workers))
    if device.is_cuda:
        torch.cuda.set_device(device.index)
    try:
        model_dir = resolve_model_dir(spec.model)
    except ValueError as err:
        raise ValueError(f"on host {socket.gethostname()!r}: {err}") from None
    store_host = spec.store_address.rsplit(":", 1)[0].strip("[]")
    if spec.backend == "gloo":
        os.environ["GLOO_SOCKET_IFNAME"] = gloo_interface(store_host)
    store = join_store(spec.store_address, spec.store_prefix, _STARTUP_TIMEOUT)
    dist.init_process_group(spec.backend, store=store, rank=spec.rank, world_size=spec.world_size,
                            timeout=_STARTUP_TIMEOUT)
    tp = None
    for stage in spec.stages:  # every rank creates every group, in the same order
        group = dist.new_group(list(stage.ranks)) if stage.tp > 1 else None
        if spec.rank in stage.ranks:
            tp = TPGroup(stage.ranks.index(spec.rank), stage.tp, group, stage.ranks)
    runner = load_stage_runner(model_dir, spec.dtype, torch_device(device), spec.stages, spec.stage_index, tp,
                               spec.rank, None, spec.block_size, spec.max_model_len)
    if runner.is_last and tp.is_leader:
        runner.start_grammars()  # the rank that samples: its tokenizer loads in the background
    return runner


def _num_kv_blocks_fitting(spec: WorkerSpec, runner: StageRunner) -> int:
    budget = kv_cache_budget_bytes(Device.parse(spec.device), spec.kv_cache_memory_fraction, spec.host_budget,
                                   spec.num_local_workers, runner.weights_bytes)
    return budget // runner.kv_block_bytes


def _send_result(conn, result) -> None:
    if result is not None:  # TP ranks other than the leader have none
        conn.send(result)


def worker_main(spec: WorkerSpec, conn) -> None:
    _die_with_parent()
    _name_process(f"hx-{spec.replica}-{spec.rank}")
    _keep_freed_memory()
    for signum in (signal.SIGINT, signal.SIGTERM):  # the driver stops its workers (or PR_SET_PDEATHSIG does)
        signal.signal(signum, signal.SIG_IGN)
    step_id = None
    try:
        runner = _load_runner(spec)
        conn.send(WorkerLoaded(spec.rank, _num_kv_blocks_fitting(spec, runner), socket.gethostname()))
        allocate = conn.recv()
        assert isinstance(allocate, AllocateKVCache), allocate
        runner.allocate_kv_cache(allocate.num_blocks)
        conn.send(WorkerReady(spec.rank))
        seqs = SeqStates()  # what this rank keeps of each sequence between steps
        while True:
            message = conn.recv()
            if isinstance(message, StepMessage):
                step_id = message.step_id
                _send_result(conn, runner.run(seqs.step(message)))
                step_id = None
            elif isinstance(message, StatsRequest):
                conn.send(runner.stats())
            elif isinstance(message, Shutdown):
                break
            else:
                raise TypeError(f"unexpected message {type(message).__name__}")
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the driver is gone or stopping
    except BaseException as err:  # report, then exit: the driver decides what happens next
        try:
            conn.send(WorkerFailed(spec.label, f"{type(err).__name__}: {err}", traceback.format_exc(), step_id))
        except (OSError, EOFError):
            pass
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
