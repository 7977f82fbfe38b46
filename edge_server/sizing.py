"""How ``--memory-mb`` is divided: the process, the weight cache, staging, the server-wide reading slots and the
budget for work in flight; and the op limits that budget implies.

Pure arithmetic over a :class:`~edge_server.config.ServerConfig` and the process's resident size now (psutil);
:class:`edge_server.runtime.EdgeRuntime` calls it once, at start.
"""

from __future__ import annotations

import torch

from edge_server.calls import RECEIVE_COPIES
from edge_server.config import MiB, ServerConfig
from edge_server.op_budget import OpLimits, measure_device_flops, measure_slow_gemm_rates


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def inflight_budget(config: ServerConfig, slots: int | None = None) -> int:
    """Bytes for work in flight under ``config.memory_bytes`` (0: unbounded).

    The cap covers the whole process: its current resident size (interpreter, torch, the code), the
    weight cache, the staging area and the server-wide reading slots (``slots``, None: :func:`reading_slots`) are
    taken off first. Raises ValueError if less than 64 MiB is left.
    """
    if not config.memory_bytes:
        return 0
    base = _rss()
    before = config.memory_bytes - base - config.cache_bytes - config.staging_bytes
    reading = reading_reserve(config, reading_slots(config, before) if slots is None else slots)
    left = before - reading
    if left < 64 * 2**20:
        raise ValueError(
            f"--memory-mb {config.memory_bytes >> 20} leaves {left >> 20} MiB for work in flight after the "
            f"process ({base >> 20} MiB), the weight cache ({config.cache_bytes >> 20} MiB), staging "
            f"({config.staging_bytes >> 20} MiB) and the requests being received ({reading >> 20} MiB, "
            "--max-reading-mb); at least 64 MiB are needed"
        )
    return left


AUTO_READING_BYTES_PER_SLOT = 160 * MiB
"""Without ``--max-reading-mb`` under ``--memory-mb``: one server-wide reading slot per this much of the budget for
work in flight (before the slots' own reserve), :data:`AUTO_READING_MAX_SLOTS` at most, none under two (one slot lets
any one silent call keep every other caller's request waiting up to ``--first-message-s``). ``--memory-mb 1024``:
722 MiB -> 4 slots (32 MiB, 64 MiB off the budget), what session 20 measured by hand."""
AUTO_READING_MAX_SLOTS = 8


def reading_slots(config: ServerConfig, left: int | None = None) -> int:
    """Requests received at once server-wide (0: no bound): ``config.max_reading_bytes // max_message_bytes`` (at
    least one) when set (0: none); unset (None) under ``memory_bytes`` with the call gate, one per
    ``AUTO_READING_BYTES_PER_SLOT`` of the budget for work in flight ``left`` (bytes before the slots' reserve;
    None: measured now, as :func:`inflight_budget`), at most ``AUTO_READING_MAX_SLOTS``, 0 under two. Each counts as
    the message limit, a request's size unknown before it is read."""
    if config.max_reading_bytes is None:
        if not config.memory_bytes or config.max_calls_per_caller <= 0:
            return 0
        if left is None:
            left = config.memory_bytes - _rss() - config.cache_bytes - config.staging_bytes
        n = min(AUTO_READING_MAX_SLOTS, max(0, left) // AUTO_READING_BYTES_PER_SLOT)
        return n if n >= 2 else 0
    if config.max_reading_bytes <= 0:
        return 0
    return max(1, config.max_reading_bytes // config.max_message_bytes)


def reading_reserve(config: ServerConfig, slots: int | None = None) -> int:
    """Host memory the requests being received may hold at once (``slots``, None: :func:`reading_slots`, x the
    message limit x ``RECEIVE_COPIES``), taken off the budget for work in flight: 0 without reading slots."""
    return (reading_slots(config) if slots is None else slots) * config.max_message_bytes * RECEIVE_COPIES


def server_reading_slots(config: ServerConfig) -> int:
    """The server's reading slots, resolved once at start (:func:`reading_slots`; unset, they depend on the
    process's resident size now): under ``memory_bytes`` from what the cap leaves after the process, the cache and
    staging; without it only an explicit ``max_reading_bytes`` (with the call gate) gives any."""
    if config.memory_bytes:
        before = config.memory_bytes - _rss() - config.cache_bytes - config.staging_bytes
        return reading_slots(config, before)
    if config.max_calls_per_caller > 0:
        return reading_slots(config, 0)
    return 0


def op_limits(config: ServerConfig, device: torch.device, inflight: int) -> OpLimits:
    """A slice's op limits on ``device`` (:class:`~edge_server.op_budget.OpLimits`): an op's workspace at most
    ``max_op_workspace_bytes`` and half the budget for work in flight ``inflight`` (bytes; 0: unbounded, then no
    peak bound), an op's time ``op_time_ms`` at the device's rates measured now (``measure_device_flops``,
    ``measure_slow_gemm_rates``: a few ms of matmuls); on a CPU the intra-op thread count the rate was scaled by
    (per-matrix work is timed at one thread's rate)."""
    return OpLimits(
        max_workspace_bytes=min(config.max_op_workspace_bytes, inflight // 2)
        if inflight
        else config.max_op_workspace_bytes,
        max_op_ms=config.op_time_ms,
        device_flops=measure_device_flops(device),
        slow_gemm_rates=measure_slow_gemm_rates(device),
        max_peak_bytes=inflight // 2,
        threads=torch.get_num_threads() if device.type == "cpu" else 1,
    )
