"""A run's final PEFT state as a standard peft adapter folder: ``RUN_DIR/adapter``.

At the end of every LoRA, IA3, prompt-tuning or prefix-tuning run
(:func:`save_adapter`) the released model is written with peft's own
``save_pretrained``: ``adapter_config.json`` (``base_model_name_or_path`` is
the base folder the run really built on, chained runs included) and
``adapter_model.safetensors`` (the adapter plus, for ``seq_cls``, the trained
classification head, peft's ``modules_to_save``). Plain transformers + peft
code then rebuilds the run's model::

    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=N)
    model = PeftModel.from_pretrained(base, "RUN_DIR/adapter")

``fedfm_adapter.json`` beside them says what peft's files do not: the task,
method, number and names of the labels, the pooling, and the base when it is
one of fedfm's random-init models (``tiny-bert``, ``tiny-llama``,
``llama-scratch``: no folder holds their weights). Some of fedfm's behaviour
is forward hooks on the model, not weights, and the two plain lines above
cannot know it (``needs_fedfm_hooks`` in the file): mean pooling
(:mod:`fedfm.models.pooling`), prefix tuning of a classifier (peft 0.21
refuses to pass a prefix to a transformers 5 classifier; fedfm's own keeps
the real tokens at positions ``0..L-1`` on BERT-style encoders) and soft
prompts on a decoder's classifier (padding moved left;
:mod:`fedfm.models.methods`). :func:`load_adapter` applies them, and
rebuilds random-init bases; otherwise it does nothing the two plain lines do not.

Full fine-tuning writes no adapter folder (``fedfm export`` merges it).
Everything is safetensors and JSON, never pickle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from fedfm.config.schema import ModelConfig, ScratchConfig
from fedfm.errors import FedfmError
from fedfm.models.chain import resolve_start
from fedfm.models.pooling import install_pooling
from fedfm.models.registry import ENCODER_TYPES, SCRATCH, load_base_model, load_tokenizer, quiet_transformers, resolve
from fedfm.registry import METHODS, PEFT

ADAPTER_DIR = "adapter"
INFO_FILE = "fedfm_adapter.json"
_ADAPTER = "default"  # peft's adapter name


def save_adapter(fm, cfg: ModelConfig, label_names, folder: str | Path) -> Path | None:
    """Write the live peft model ``fm.model`` (its trainable state already final) to ``folder``.

    ``cfg`` is the run's model config (``start_from`` not yet resolved).
    Returns the folder, or None for a method without an adapter (``full``).
    The folder appears complete or not at all (written beside it, then renamed).
    """
    if not METHODS.supports(cfg.method, PEFT):
        return None
    base = resolve_start(cfg)
    source = resolve(base.name, scratch=base.scratch)
    peft_cfg = fm.model.peft_config[_ADAPTER]
    peft_cfg.base_model_name_or_path = str(source.path) if source.path is not None else base.name
    target = Path(folder)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fm.model.save_pretrained(str(tmp), safe_serialization=True)
    info = {
        "task": cfg.task,
        "method": cfg.method,
        "base": peft_cfg.base_model_name_or_path,
        "base_random_init": source.random_init,
        "scratch": base.scratch.model_dump(mode="json") if source.tiny == SCRATCH else None,
        "pooling": fm.pooling,  # model.pooling made concrete (auto: what the base folder declares)
        "num_labels": len(label_names) if cfg.task == "seq_cls" and label_names else None,
        "label_names": list(label_names) if cfg.task == "seq_cls" and label_names else None,
        "max_length": cfg.max_length,
        # what the two plain peft lines miss (see the module docstring)
        "needs_fedfm_hooks": _needs_hooks(fm, cfg),
    }
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _needs_hooks(fm, cfg: ModelConfig) -> bool:
    """Whether the run's model has forward hooks the two plain peft lines miss (the module docstring)."""
    if cfg.task != "seq_cls":
        return False
    decoder = fm.model.get_base_model().config.model_type not in ENCODER_TYPES
    return fm.pooling != "cls" or cfg.method == "prefix" or (cfg.method == "prompt" and decoder)


def read_info(folder: str | Path) -> dict:
    """``fedfm_adapter.json`` of an adapter folder, with one-line errors."""
    folder = Path(folder)
    path = folder / INFO_FILE
    if not (folder / "adapter_config.json").is_file() or not path.is_file():
        raise FedfmError(f"{folder} is not a fedfm adapter folder (needs adapter_config.json and {INFO_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FedfmError(f"cannot read {path}: {e}") from None


def base_for(info: dict) -> torch.nn.Module:
    """The base model an adapter folder was trained on, built the way fedfm builds it (float32)."""
    scratch = ScratchConfig(**info["scratch"]) if info.get("scratch") else None
    source = resolve(info["base"], scratch=scratch)
    tokenizer = load_tokenizer(source.tokenizer_path)
    model = load_base_model(source, info["task"], info.get("num_labels"), tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_adapter(folder: str | Path, base: torch.nn.Module | None = None) -> torch.nn.Module:
    """``PeftModel.from_pretrained(base, folder)`` plus fedfm's hooks (pooling, prefix tuning), in eval mode.

    ``base``: the base model (a fresh one, not wrapped before); None builds it
    from ``fedfm_adapter.json`` (:func:`base_for`). A base that does not fit
    the adapter is a one-line :class:`FedfmError`.
    """
    from peft import PeftModel

    info = read_info(folder)
    model = base_for(info) if base is None else base
    install_pooling(model, info.get("pooling", "cls"))
    try:
        with quiet_transformers():
            wrapped = PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError) as e:
        lines = str(e).strip().splitlines()
        raise FedfmError(f"the base model does not fit the adapter {folder}: {lines[0] if lines else e}") from None
    METHODS.get(info["method"]).obj().after_wrap(wrapped, model, info["task"])
    return wrapped.eval()
