"""Timing and peak-memory helpers for the benchmarks.

``measure(fn, *args, repeats=5, warmup=1)`` -> ``(median_seconds, peak_extra_bytes, result)``.

CPU functions: peak memory is the peak *resident set size* of the process during the call minus the
resident size just before it, so numpy, torch, scipy and C++ allocations all count (tracemalloc
would only see Python/numpy allocations). Method, in order of preference:

1. ``clear_refs``: write ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), which resets the kernel's
   peak-RSS counter ``VmHWM`` to the current RSS; run the call; read ``VmHWM`` from
   ``/proc/self/status``. Exact (kernel-accounted), no sampling gap.
   (``BENCH_MEM_METHOD=sampler|tracemalloc`` forces a fallback, for testing.)
2. ``sampler``: if ``clear_refs`` is refused, a background thread polls ``VmRSS`` every 0.2 ms during
   the call (can miss spikes shorter than the period).
3. ``tracemalloc``: without ``/proc`` (not Linux): Python/numpy allocations only.

Before each measured call: ``gc.collect()`` and glibc ``malloc_trim(0)`` so that memory freed by an
earlier call but cached by the allocator does not hide this call's allocations. Only memory that is
actually touched counts (RSS). :func:`validate` checks the reading against known allocations
(a 400 MiB numpy array and a 400 MiB torch tensor).

CUDA functions (``cuda=True``): ``torch.cuda.synchronize()`` around the call, time from CUDA events
(``elapsed_time``), peak = ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``
minus ``memory_allocated()`` before the call (device memory from the caching allocator; host memory
is not reported for CUDA calls).
"""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time

__all__ = ["measure", "measure_stats", "method", "validate", "rss_bytes"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_METHOD = None


def _read_status(keys=("VmRSS", "VmHWM")) -> dict:
    out = {}
    with open(_STATUS) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) * 1024  # kB -> bytes
    return out


def rss_bytes() -> int:
    """Current resident set size in bytes (0 where /proc is unavailable)."""
    try:
        return _read_status(("VmRSS",))["VmRSS"]
    except (OSError, KeyError):
        return 0


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def method() -> str:
    """The peak-memory method in use: 'clear_refs', 'sampler' or 'tracemalloc'."""
    global _METHOD
    if _METHOD is None:
        forced = os.environ.get("BENCH_MEM_METHOD")  # for testing the fallbacks
        if forced in ("clear_refs", "sampler", "tracemalloc"):
            _METHOD = forced
        elif not os.path.exists(_STATUS):
            _METHOD = "tracemalloc"
        elif _reset_hwm() and "VmHWM" in _read_status():
            _METHOD = "clear_refs"
        else:
            _METHOD = "sampler"
    return _METHOD


_LIBC = None


def _trim():
    """Return freed heap memory to the OS (glibc), so the baseline RSS holds no cached free memory."""
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim(0)
        except (OSError, AttributeError):
            _LIBC = False
    elif _LIBC:
        _LIBC.malloc_trim(0)


class _Sampler(threading.Thread):
    def __init__(self, period=2e-4):
        super().__init__(daemon=True)
        self.period, self.peak, self._stop_event = period, 0, threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def stop(self):
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, rss_bytes())


def _cpu_call(fn, args, kwargs):
    """One call: (seconds, peak_extra_bytes, result)."""
    _trim()
    m = method()
    if m == "clear_refs":
        before = rss_bytes()
        _reset_hwm()
        t0 = time.perf_counter()
        res = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
        peak = _read_status()["VmHWM"] - before
    elif m == "sampler":
        before = rss_bytes()
        s = _Sampler()
        s.start()
        t0 = time.perf_counter()
        res = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
        s.stop()
        peak = s.peak - before
    else:
        import tracemalloc

        tracemalloc.start()
        t0 = time.perf_counter()
        res = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return dt, max(0, peak), res


def _cuda_call(fn, args, kwargs):
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    res = fn(*args, **kwargs)
    end.record()
    torch.cuda.synchronize()
    dt = start.elapsed_time(end) / 1e3
    peak = torch.cuda.max_memory_allocated() - before
    return dt, max(0, peak), res


def measure_stats(fn, *args, repeats: int = 5, warmup: int = 1, cuda: bool = False,
                  budget_s: float | None = None, **kwargs) -> dict:
    """Like :func:`measure`, returning ``{"median_s", "times", "peak_bytes", "result"}``.

    ``budget_s``: stop repeating once the measured runs have taken this long in total (at least one
    run), so slow baselines get fewer repeats than fast ones.
    """
    call = _cuda_call if cuda else _cpu_call
    res = None
    for _ in range(max(0, warmup)):
        res = None
        res = fn(*args, **kwargs)
    times, peaks = [], []
    for _ in range(max(1, repeats)):
        res = None
        dt, peak, res = call(fn, args, kwargs)
        times.append(dt)
        peaks.append(peak)
        if budget_s is not None and sum(times) >= budget_s:
            break
    return {"median_s": statistics.median(times), "times": times, "peak_bytes": max(peaks), "result": res}


def measure(fn, *args, repeats: int = 5, warmup: int = 1, cuda: bool = False, **kwargs):
    """Run ``fn(*args, **kwargs)`` ``warmup`` times untimed, then ``repeats`` times measured.

    Returns ``(median_seconds, peak_extra_bytes, result)``: the median wall time of the measured
    runs, the largest peak memory above the pre-call level among them (host RSS, or CUDA allocator
    memory with ``cuda=True``), and the result of the last run. The previous result is dropped
    before each run so it does not count in the baseline.
    """
    st = measure_stats(fn, *args, repeats=repeats, warmup=warmup, cuda=cuda, **kwargs)
    return st["median_s"], st["peak_bytes"], st["result"]


def validate(mib: int = 400, tol: float = 0.05) -> dict:
    """Check the reading against known allocations: a touched ``mib`` MiB numpy array and torch
    tensor, each freed before the function returns. Returns ``{"method", "numpy_MiB", "torch_MiB",
    "ok"}``; ``ok`` when both readings are within ``tol`` (relative) of ``mib`` (or above it by at
    most 16 MiB of interpreter noise)."""
    import numpy as np
    import torch

    n = mib * 2**20

    def np_alloc():
        a = np.ones(n // 8, dtype=np.float64)  # np.ones touches every page
        s = float(a[::4096].sum())
        del a
        return s

    def torch_alloc():
        t = torch.ones(n // 4, dtype=torch.float32)
        s = float(t[::4096].sum())
        del t
        return s

    _, p_np, _ = measure(np_alloc, repeats=1, warmup=0)
    _, p_t, _ = measure(torch_alloc, repeats=1, warmup=0)
    got = (p_np / 2**20, p_t / 2**20)
    ok = all(mib * (1 - tol) <= g <= mib * (1 + tol) + 16 for g in got)
    return {"method": method(), "numpy_MiB": round(got[0], 1), "torch_MiB": round(got[1], 1),
            "expected_MiB": mib, "ok": bool(ok)}


if __name__ == "__main__":
    print(validate())
