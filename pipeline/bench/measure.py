"""Timing and memory helpers of `dept bench`: an RSS sampler thread, a step's tensor peak, paired summaries."""

from __future__ import annotations

import math
import resource
import statistics
import threading
import time


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



def sync() -> None:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.synchronize()



def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"



def tensor_peak(step) -> tuple[float, float | None]:
    """Run `step()` once and return (transient tensor peak MB, absolute allocator peak MB or None).

    CPU: torch.profiler with profile_memory=True records every CPU tensor allocation and free; the running sum
    in time order, maximised, is the highest amount of tensor memory the step held on top of what was live when it
    started (activations, gathered ZeRO-3 parameters, gradients, optimizer temporaries; not the resident model and
    optimizer state, and not the allocator's cached or fragmented pages, which RSS shows). GPU: the accelerator
    allocator's max_memory_allocated during the step, minus memory_allocated before it (and the absolute peak).
    """
    import torch
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.synchronize()
        accel.reset_peak_memory_stats()
        before = accel.memory_allocated()
        step()
        accel.synchronize()
        peak = accel.max_memory_allocated()
        return (peak - before) / 2**20, peak / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20, None



def summary(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"median": None, "min": None, "max": None, "mean": None, "n": 0}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite),
            "mean": statistics.fmean(finite), "n": len(finite)}



def paired(a: list[float], b: list[float]) -> dict:
    """Ratios a_i / b_i of steps taken in the same round (side by side), summarised."""
    return summary([x / y for x, y in zip(a, b) if y])



def rss_mb() -> float:
    """This process's peak resident set size (Linux ru_maxrss, KiB) in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
