"""Pre-flight memory check: refuse a model or adapter that cannot fit, before allocating it.

:func:`check_fits` builds the wrapped model on PyTorch's ``meta`` device
(shapes only, no storage, the global RNG untouched), counts its parameters
and compares what training needs with the memory the target device has
free. Training needs, in float32, every parameter once plus, for every
trainable one, its gradient and two optimizer moments (Adam's first and
second moments: the largest optimizer state fedfm uses). Activations and
the data are not counted, so the estimate is a lower bound: a run it lets
through may still be tight, but a run it refuses could never have started
(seen: ``model.lora.r=100000000`` on a 2-layer model asked for about
100 GB and died in the allocator with a traceback).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Callable

import torch

from fedfm.errors import FedfmError

log = logging.getLogger("fedfm")

BYTES_PER_VALUE = 4  # float32 weights, gradients and optimizer moments
STATE_COPIES = 3  # per trainable parameter: its gradient and two optimizer moments
GIB = 1024**3
_libc = None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: the GPU's free memory, or the machine's ``MemAvailable``; None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def training_bytes(total: int, trainable: int) -> int:
    """Bytes to hold ``total`` parameters and the training state of ``trainable`` of them."""
    return BYTES_PER_VALUE * (total + STATE_COPIES * trainable)


def count_on_meta(build: Callable[[], torch.nn.Module]) -> tuple[int, int]:
    """``(parameters, trainable parameters)`` of the model ``build()`` makes, built on the meta device.

    The global RNG state is restored afterwards (some initialisers draw from
    it even on meta tensors), so the check never changes a run's results.
    """
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def check_fits(build: Callable[[], torch.nn.Module], what: str, device: torch.device) -> None:
    """Raise :class:`FedfmError` (one line, both numbers) when training ``build()`` cannot fit on ``device``.

    ``what`` names the model in the message (e.g. ``"tiny-bert with method lora"``).
    A model that cannot be built on the meta device is let through: the real
    build then reports its own error.
    """
    free = available_bytes(device)
    if free is None:
        return
    try:
        total, trainable = count_on_meta(build)
    except FedfmError:
        raise
    except Exception as e:  # an operation without a meta kernel: skip the estimate
        log.debug("memory pre-flight skipped for %s: %s", what, e)
        return
    need = training_bytes(total, trainable)
    if need > free:
        raise FedfmError(
            f"{what} needs about {need / GIB:.1f} GiB to train ({total:,} parameters, {trainable:,} trainable, "
            f"with gradients and optimizer moments) but only {free / GIB:.1f} GiB is available on {device}: "
            "choose a smaller model or adapter"
        )


def trim_heap() -> None:
    """Return the C allocator's free memory to the system (glibc only; elsewhere nothing)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
