"""A client's measured peak memory during local training (replacing the estimate users see).

``with PeakMemory(device) as peak: train()`` then ``peak.bytes``: how far memory
rose above where it stood when training began, at its highest.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus what was allocated at the start (the caching allocator's own counters).
* CPU (Linux): the process's peak resident set (``VmHWM`` in ``/proc/self/status``),
  reset to the current resident set by writing ``5`` to ``/proc/self/clear_refs``,
  minus the resident set at the start. The C allocator first hands its free
  pages back to the system (glibc's ``malloc_trim``), so that memory freed by
  the previous client is not counted as already there.
* Elsewhere (no writable ``clear_refs``): a thread samples the resident set
  every 5 ms (psutil); a peak shorter than that can be missed.

What a client needs is this rise plus what it holds before training starts:
the frozen base and its trainable state (:func:`fedfm.models.quantize.model_bytes`,
counted from the tensors' storage). In a simulation every client shares one
model, so the rise is what each client's training adds.
"""

from __future__ import annotations

import threading

import torch

from fedfm.models.memory import trim_heap
from fedfm.models.quantize import model_bytes

# What a round records from measurement (like its wall time): never the same twice, never compared
MEASURED_KEYS = ("client_memory_mb_mean", "client_memory_mb_max", "client_step_s")
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _status_kb(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak rise of memory on ``device`` over its block (``.bytes``; None if unknown)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.bytes: int | None = None
        self._start = 0
        self._sampler: _Sampler | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        trim_heap()
        rss = _status_kb("VmRSS")
        if rss is not None and _reset_hwm():
            self._start = rss * 1024
        else:
            self._sampler = _Sampler()
            self._start = self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        elif self._sampler is not None:
            peak = self._sampler.stop()
            self.bytes = None if peak is None else max(0, peak - self._start)
        else:
            hwm = _status_kb("VmHWM")
            self.bytes = None if hwm is None else max(0, hwm * 1024 - self._start)


class _Sampler:
    """The resident set sampled every 5 ms on a thread (where the kernel's peak cannot be reset)."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        try:
            import psutil
        except ImportError:
            return 0
        proc = psutil.Process()
        self.peak = proc.memory_info().rss

        def loop():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self.peak

    def stop(self) -> int | None:
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        return self.peak


def measured_by(device: torch.device | str) -> str:
    """How :class:`PeakMemory` measures on ``device`` in this process (for summary.json)."""
    if torch.device(device).type == "cuda":
        return "cuda max_memory_allocated"
    if _status_kb("VmRSS") is not None and _reset_hwm():
        return "peak RSS (VmHWM, reset per client)"
    return "RSS sampled every 5 ms"


def memory_summary(model: torch.nn.Module, quantize: str, records: list[dict], device) -> dict:
    """summary.json's ``client_memory``: what a client holds (the base as stored, the trainable state)
    and the measured peaks while clients trained (mean of the rounds' means, max of their maxima), in MB."""
    means = [r["client_memory_mb_mean"] for r in records if r.get("client_memory_mb_mean") is not None]
    maxima = [r["client_memory_mb_max"] for r in records if r.get("client_memory_mb_max") is not None]
    out = {"quantize": quantize, "base_model_mb": model_bytes(model, trainable=False) / 2**20,
           "trainable_mb": model_bytes(model, trainable=True) / 2**20, "measured_by": measured_by(device)}
    if means:
        out["peak_mb_mean"] = sum(means) / len(means)
        out["peak_mb_max"] = max(maxima)
    steps = [r["client_step_s"] for r in records if r.get("client_step_s") is not None]
    if steps:
        out["step_s_mean"] = sum(steps) / len(steps)  # wall seconds per local step, mean over the rounds
    return out
