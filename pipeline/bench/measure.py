"""Timing and memory helpers of `dept bench`: an RSS sampler thread, a timed call, a step's tensor peak, paired
summaries."""

from __future__ import annotations

import math
import resource
import statistics
import threading
import time
from collections.abc import Callable

import torch


class MemorySampler:
    """A background thread that reads this process's RSS (and the system's available memory) every `interval`
    seconds and keeps, per label, the highest RSS seen while that label was current (the configuration running)."""

    def __init__(self, interval: float = 0.01, timeline_every: float = 0.25):
        import psutil

        self._proc = psutil.Process()
        self._psutil = psutil
        self.interval, self.timeline_every = interval, timeline_every
        self.label = "setup"
        self.peak_rss: dict[str, int] = {}
        self.min_available = psutil.virtual_memory().available
        self.total = psutil.virtual_memory().total
        self.timeline: list[tuple[float, int, int, str]] = []  # (t, rss, system used, label)
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-memory")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        rss = self._proc.memory_info().rss
        available = self._psutil.virtual_memory().available
        label = self.label
        self.peak_rss[label] = max(self.peak_rss.get(label, 0), rss)
        self.min_available = min(self.min_available, available)
        now = time.perf_counter() - self._start
        if not self.timeline or now - self.timeline[-1][0] >= self.timeline_every:
            self.timeline.append((round(now, 3), rss, self.total - available, label))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


# ---- Accelerator memory and synchronisation, by torch.accelerator on the engine's device. Candidates for
# pipeline.engine (next to peak_memory_mb), so that every accelerator call has one home: see synchronize,
# reset_peak_memory, memory_allocated_mb and device_memory_mb below.


def synchronize(device: torch.device) -> None:
    """Wait for the accelerator's queued work, so that a wall-clock interval covers it (no-op on CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats(device)


def memory_allocated_mb(device: torch.device) -> float:
    return torch.accelerator.memory_allocated(device) / 2**20


def device_memory_mb(device: torch.device) -> float | None:
    """The accelerator's total memory; None on CPU."""
    if device.type == "cpu":
        return None
    _, total = torch.accelerator.get_memory_info(device)
    return total / 2**20


# ---- end of the candidates


def tensor_peak(step: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """Run `step()` once and return (transient tensor peak MB, absolute allocator peak MB or None).

    CPU: torch.profiler with profile_memory=True records every CPU tensor allocation and free; the running sum
    in time order, maximised, is the highest amount of tensor memory the step held on top of what was live when it
    started (activations, gathered ZeRO-3 parameters, gradients, optimizer temporaries; not the resident model and
    optimizer state, and not the allocator's cached or fragmented pages, which RSS shows). Accelerator: its
    allocator's peak during the step, minus what was allocated before it (and the absolute peak).
    """
    if device.type != "cpu":
        synchronize(device)
        reset_peak_memory(device)
        before = memory_allocated_mb(device)
        step()
        synchronize(device)
        peak = torch.accelerator.max_memory_allocated(device) / 2**20
        return peak - before, peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20, None


def timed(call: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of `call()`, the accelerator synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return time.perf_counter() - start, result


def measured(
    call: Callable[[], object], sampler: MemorySampler, label: str, device: torch.device
) -> tuple[float, object]:
    """`timed(call)`, the RSS sampler filing what it sees meanwhile under `label` (then under "between")."""
    sampler.label = label
    try:
        return timed(call, device)
    finally:
        sampler.label = "between"


def summary(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"median": None, "min": None, "max": None, "mean": None, "n": 0}
    return {
        "median": statistics.median(finite),
        "min": min(finite),
        "max": max(finite),
        "mean": statistics.fmean(finite),
        "n": len(finite),
    }


def paired(a: list[float], b: list[float]) -> dict:
    """Ratios a_i / b_i of steps taken in the same round (side by side), summarised."""
    return summary([x / y for x, y in zip(a, b) if y])


def rss_mb() -> float:
    """This process's peak resident set size (Linux ru_maxrss, KiB) in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
