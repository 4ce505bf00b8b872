"""Chained runs: start a run from an earlier run's result (``model.start_from``).

A foundation model's life in federation is a sequence of runs — pre-train →
fine-tune → prompt-tune → continual — each one a config whose
``model.start_from`` names the run folder of the step before. How a run
starts from an earlier one depends on whether it trains the same thing:

* **same method and task** (e.g. continual learning after LoRA fine-tuning
  with the same adapter shape): the new run keeps the earlier run's base and
  starts its trainable state from the earlier ``final_state.safetensors`` —
  round 0 of the new run *is* the earlier final model;
* **anything else** (full pre-training → LoRA fine-tuning, LoRA → prompt
  tuning, causal LM → classification): the earlier model is merged and
  exported as a Hugging Face folder (:func:`export_run`; LoRA/IA3 adapters
  are folded into the weights with peft's ``merge_and_unload``) and that
  folder becomes the new run's frozen base, wrapped for the new method.

Soft prompts and prefixes cannot be folded into weights: a run can only
continue from a prompt/prefix run with the same method.

The export is cached in ``RUN_DIR/export/`` and reused while the earlier
run's final state is unchanged (a sha256 in ``fedfm_export.json``).
Everything is written with ``save_pretrained`` (safetensors), never pickle.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from fedfm.config.schema import ModelConfig
from fedfm.errors import FedfmError
from fedfm.models.assemble import assemble_model
from fedfm.models.pooling import declare_pooling
from fedfm.models.state import load_state
from fedfm.registry import MERGES_INTO_BASE, METHODS, PEFT

STATE_FILE = "final_state.safetensors"
EXPORT_DIR = "export"
MARKER = "fedfm_export.json"
MAX_CHAIN = 32  # a longer chain of start_from links is almost surely a cycle


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def earlier_run(run_dir: str | Path):
    """(the earlier run's RunConfig, its final state file), with one-line errors."""
    from fedfm.config import validate

    run = Path(run_dir).expanduser()
    cfg_file, state_file = run / "config.yaml", run / STATE_FILE
    if not cfg_file.is_file() or not state_file.is_file():
        raise FedfmError(
            f"model.start_from: {run} is not a finished fedfm run (needs config.yaml and {STATE_FILE})"
        )
    try:
        data = yaml.safe_load(cfg_file.read_text())
    except yaml.YAMLError as e:
        raise FedfmError(f"model.start_from: cannot read {cfg_file}: {e}") from None
    return validate(data), state_file


def _base_fields(model: ModelConfig) -> dict:
    """The fields that say which base network a model config builds."""
    return {k: getattr(model, k) for k in ("name", "scratch") if k in type(model).model_fields}


def resolve_start(cfg: ModelConfig, _depth: int = 0) -> ModelConfig:
    """``cfg`` with ``start_from`` replaced by a base (``name``) and, where it applies, ``init_state``.

    A config without ``start_from`` is returned unchanged.
    """
    if not cfg.start_from:
        return cfg
    if _depth >= MAX_CHAIN:
        raise FedfmError(f"model.start_from: more than {MAX_CHAIN} chained runs (a cycle?) at {cfg.start_from}")
    if cfg.init_state:
        raise FedfmError("set only one of model.start_from and model.init_state")
    prev_cfg, state_file = earlier_run(cfg.start_from)
    prev = resolve_start(prev_cfg.model, _depth + 1)
    if cfg.method == prev.method and cfg.task == prev.task:
        base = _base_fields(prev)
        if "name" in cfg.model_fields_set and cfg.name != prev.name:
            raise FedfmError(
                f"model.name={cfg.name!r} differs from the base {prev.name!r} of the run it starts from "
                f"({cfg.start_from}); leave model.name out"
            )
        return cfg.model_copy(update={**base, "init_state": str(state_file), "start_from": None})
    folder = export_run(cfg.start_from)
    return cfg.model_copy(update={"name": str(folder), "start_from": None})


def base_name(cfg: ModelConfig) -> str:
    """The base model a config really builds on (the earlier run's base or export with ``start_from``)."""
    return resolve_start(cfg).name


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the earlier run's final model as a Hugging Face folder (default ``RUN_DIR/export``).

    The run's own base (itself possibly chained) is rebuilt, its final
    trainable state loaded, adapters merged into the weights, and the model
    and tokenizer saved with ``save_pretrained`` (safetensors). A run trained on
    a quantized base (``model.quantize``) merges into the float32 values of the
    quantized weights, so the export computes what the clients trained. Returns the folder.
    """
    prev_cfg, state_file = earlier_run(run_dir)
    model_cfg = prev_cfg.model
    if not METHODS.supports(model_cfg.method, MERGES_INTO_BASE):
        raise FedfmError(
            f"the {model_cfg.method} run {run_dir} cannot be merged into a base model; "
            f"start from it with method={model_cfg.method} and task={model_cfg.task}"
        )
    target = Path(out) if out is not None else Path(run_dir) / EXPORT_DIR
    digest = _sha256(state_file)
    marker = target / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("state_sha256") == digest:
                return target
        except json.JSONDecodeError:
            pass  # a damaged marker: export again
    _, meta = load_state(state_file)
    num_labels = int(meta.get("num_labels", "0") or 0) or None
    base = resolve_start(model_cfg)
    fm = assemble_model(  # a run trained on a quantized base merges into that base's float32 values
        base.model_copy(update={"init_state": str(state_file)}), num_labels, seed=prev_cfg.seed, device="cpu",
        dequantize_base=True,
    )
    model = fm.model.merge_and_unload() if METHODS.supports(model_cfg.method, PEFT) else fm.model
    model.config.pad_token_id = fm.tokenizer.pad_token_id
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    fm.tokenizer.save_pretrained(str(tmp))
    declare_pooling(tmp, fm.pooling, model.config.hidden_size)  # a mean-pooled head stays mean-pooled
    info = {"source_run": str(Path(run_dir).resolve()), "state_sha256": digest, "method": model_cfg.method,
            "task": model_cfg.task, "base": str(base.name)}
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # the folder appears complete or not at all
    return target
