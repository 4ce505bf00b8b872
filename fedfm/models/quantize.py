"""``model.quantize``: hold the frozen base quantized, so an edge client trains an adapter within less memory.

Modes (:data:`fedfm.registry.QUANTIZERS`; ``none`` keeps float32):

* ``int8`` -- every frozen ``nn.Linear`` weight as int8 with one float scale per
  output channel (weight-only: activations and the matmul stay float32; the
  weight is dequantized on the fly);
* ``nf4``  -- every frozen ``nn.Linear`` weight as 4-bit NormalFloat in blocks of
  64 values, the blocks' scales themselves quantized ("double quantization"),
  as in QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized
  LLMs"), which reports 4-bit NF4 bases matching 16-bit fine-tuning quality.

In both modes the input embedding table (the largest single tensor of a small
model: 54% of MiniLM) is held as int8 with one scale per row; a causal LM whose
output layer shares it (SmolLM2) keeps sharing the quantized table. The task
head, the trainable adapter, norms and position embeddings stay float32: only
the frozen base is quantized, and nothing on the wire changes.

The library is torchao (the PyTorch project's quantization library): its
int8 weight-only and NF4 tensors run forward and backward on the CPU and on
CUDA, and peft's LoRA and IA3 layers wrap a ``nn.Linear`` holding one
unchanged. bitsandbytes 0.50 was measured beside it on this CPU (MiniLM, LoRA,
batch 16 x 128 tokens): its int8 path casts activations to float16 and took
2.2x the float32 step time against torchao's 1.2x, and it leaves embeddings
in float32 unless they are swapped for its own modules; its NF4 was 1.4x. See
the README's "Edge clients" section for the measured table.

Layers are quantized one at a time, right after the (memory-mapped) float32
checkpoint is loaded: each float32 weight is read from the mapped file and
dropped as soon as its quantized form exists, and the mapping is released at
the end (:func:`own_memory_`), so the process never allocates the float32 model.
Quantizing a large table still allocates float32 temporaries of that table
(the load's peak is measured by ``bench/edge.py --load``).
"""

from __future__ import annotations

import gc
import logging
import warnings
from typing import Callable

import torch

from fedfm.errors import FedfmError
from fedfm.models.memory import trim_heap
from fedfm.registry import QUANTIZERS

log = logging.getLogger("fedfm")

NF4_BLOCK = 64  # values per NF4 block (QLoRA's)
NF4_SCALER_BLOCK = 256  # block scales per double-quantization block (QLoRA's)


def _torchao():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_, to_nf4
            from torchao.quantization.granularity import PerAxis
    except ImportError:
        raise FedfmError("model.quantize needs torchao: pip install 'fedfm[edge]' (or pip install torchao)") from None
    return Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerAxis, quantize_, to_nf4


def int8_rows(module: torch.nn.Module) -> None:
    """``module``'s weight (an embedding table, or a linear layer) as int8 with one scale per row, in place."""
    _, IntxWeightOnlyConfig, PerAxis, quantize_, _ = _torchao()
    quantize_(module, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
              filter_fn=lambda m, fqn: m is module)


def _int8_linear(linear: torch.nn.Linear) -> None:
    Int8WeightOnlyConfig, *_, quantize_, _ = _torchao()
    quantize_(linear, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: m is linear)


def nf4_blocks(numel: int) -> tuple[int, int] | None:
    """``(block_size, scaler_block_size)`` for an NF4 tensor of ``numel`` values, or None when none fits.

    QLoRA's 64 and 256 where they divide; else the largest powers of two that
    do (a tiny layer), since torchao's NF4 needs whole blocks of both.
    """
    block = next((b for b in (NF4_BLOCK, 32, 16, 8) if numel % b == 0), None)
    if block is None:
        return None
    blocks = numel // block
    scaler = next(s for s in (NF4_SCALER_BLOCK, 128, 64, 32, 16, 8, 4, 2, 1) if blocks % s == 0)
    return block, scaler


def _nf4_linear(linear: torch.nn.Linear) -> None:
    *_, to_nf4 = _torchao()
    sizes = nf4_blocks(linear.weight.numel())
    if sizes is None:  # e.g. an odd width: int8 instead, never silently float32
        log.info("model.quantize=nf4: a %s weight has no whole NF4 blocks; held as int8", tuple(linear.weight.shape))
        _int8_linear(linear)
        return
    linear.weight = torch.nn.Parameter(to_nf4(linear.weight.detach(), *sizes), requires_grad=False)


class Quantizer:
    """One mode: how a frozen ``nn.Linear`` is quantized (embeddings are int8 per row in every mode)."""

    def linear(self, linear: torch.nn.Linear) -> None:
        raise NotImplementedError


@QUANTIZERS.register("int8", summary="int8 weight-only, one scale per output channel (torchao)")
class Int8(Quantizer):
    def linear(self, linear):
        _int8_linear(linear)


@QUANTIZERS.register("nf4", summary="4-bit NormalFloat with double-quantized block scales (QLoRA; torchao)")
class NF4(Quantizer):
    def linear(self, linear):
        _nf4_linear(linear)


QUANTIZERS.add("none", None, summary="float32 base (no quantization)")


def quantize_base_(model: torch.nn.Module, mode: str, skip: list[str] = (), dequantize: bool = False) -> int:
    """Quantize ``model``'s frozen base in place for ``mode``; returns how many weights were quantized.

    ``skip``: top-level module names left in float32 (the task head, which trains).
    ``dequantize``: put every quantized weight back as the float32 tensor of its
    quantized values: the same function, in float32 layers that any tool can
    merge an adapter into (``fedfm export`` of a run trained on a quantized base).
    Call it before the model is wrapped for its method, on the CPU.
    """
    if mode == "none":
        return 0
    quantizer: Quantizer = QUANTIZERS.get(mode).obj()
    skipped = tuple(f"{s}." for s in skip)
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out is not None and emb is not None and out.weight is emb.weight
    done = 0
    if emb is not None:
        with torch.no_grad():
            int8_rows(emb)
            if dequantize:
                emb.weight = torch.nn.Parameter(dequantized(emb.weight).clone(), requires_grad=False)
        done += 1
        if tied:  # one quantized table for both ends, as the float32 one was shared
            out.weight = emb.weight
        _release()
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name in skip or name.startswith(skipped) \
                or _is_quantized(module.weight) or (tied and module is out):  # a head, or the tied output layer
            continue
        with torch.no_grad():
            quantizer.linear(module)
            if dequantize:
                module.weight = torch.nn.Parameter(dequantized(module.weight).clone(), requires_grad=False)
        done += 1
        if done % 16 == 0:  # free the float32 weights and temporaries as we go, not at the end
            _release()
    for p in model.parameters():  # the base is frozen; the method's wrapper unfreezes what trains
        if _is_quantized(p):
            p.requires_grad_(False)
    return done


def _release() -> None:
    """Collect the float32 weights just replaced (torchao's tensors can hold them in reference cycles)
    and hand the freed pages back to the system."""
    gc.collect()
    trim_heap()


def own_memory_(model: torch.nn.Module) -> None:
    """Copy every plain parameter and buffer into memory the process allocates itself, in place.

    transformers maps a safetensors checkpoint into memory and its tensors stay
    views of the file; after quantization a few small float32 tensors (norms,
    biases) would keep the whole mapping, and the pages read while quantizing,
    resident. Copied, the mapping is released, the float32 pages with it, and
    the process's resident memory is what the model really holds (which the
    measured client memory then sees from the start, not at the first forward).
    """
    seen = set()
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for name, t in list(tensors.items()):
                    if t is None or id(t) in seen or _is_quantized(t):
                        continue
                    seen.add(id(t))
                    if isinstance(t, torch.nn.Parameter):
                        t.data = t.data.clone()
                    else:
                        tensors[name] = t.clone()


def _is_quantized(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, torch.nn.Parameter) or type(t.data) is not torch.Tensor


def dequantized(t: torch.Tensor) -> torch.Tensor:
    """A plain float32 tensor of ``t``'s values (a quantized weight decoded; a plain tensor as it is)."""
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(data) is torch.Tensor:
        return data
    if hasattr(data, "get_original_weight"):  # torchao's NF4Tensor
        return data.get_original_weight().float()
    return data.dequantize().float()


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds: a plain tensor's elements, a quantized tensor's inner tensors (codes, scales)."""
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    flatten: Callable | None = getattr(data, "__tensor_flatten__", None)
    if type(data) is torch.Tensor or flatten is None:
        return data.numel() * data.element_size()
    names, _ = flatten()
    return sum(storage_bytes(getattr(data, n)) for n in names)


def model_bytes(model: torch.nn.Module, trainable: bool | None = None) -> int:
    """Bytes of ``model``'s parameters and buffers, each shared tensor once.

    ``trainable``: True counts only parameters that train, False only the frozen
    ones and the buffers, None everything.
    """
    seen, total = set(), 0
    tensors = [(p, p.requires_grad) for p in model.parameters()] + [(b, False) for b in model.buffers()]
    for t, trains in tensors:
        if id(t) in seen or (trainable is not None and trains != trainable):
            continue
        seen.add(id(t))
        total += storage_bytes(t)
    return total

