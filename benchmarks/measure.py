"""Timing and peak memory for the benchmark scripts: clocks read once the device has run its work; peaks from the
GPU allocator, or from the CPU's resident set size sampled every 2 ms."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from mima.utils.device import peak_memory_bytes, start_peak_memory, synchronize


class RssSampler(threading.Thread):
    """The peak resident set size of this process while running, sampled (CPU has no allocator peak counter)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.start_rss = self.peak = self.rss()
        self.running = True

    @staticmethod
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)


def peaks(run, device) -> dict[str, int]:
    """Peak memory while `run()` runs, model included (`peak_bytes`: the allocator's peak on a GPU, the process's
    peak RSS on the CPU), and what the run itself added above what was already loaded (`step_peak_bytes`)."""
    allocated = start_peak_memory(device)
    sampler = RssSampler()
    sampler.start()
    run()
    sampler.running = False
    sampler.join()
    peak = peak_memory_bytes(device) or 0
    step_peak = sampler.peak - sampler.start_rss if allocated is None else peak - allocated
    return {"step_peak_bytes": step_peak, "peak_bytes": peak}


def seconds_per_step(step, steps: int, device) -> float:
    """The fastest of `steps` timed calls, each until `device` has run its work: the one least disturbed by other
    load on a shared machine."""
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def time_calls(cls: type, method: str, seconds: list[float], device) -> None:
    """Make every call of `cls.method` append its seconds to `seconds`."""
    original = getattr(cls, method)

    def timed(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        return out

    setattr(cls, method, timed)
