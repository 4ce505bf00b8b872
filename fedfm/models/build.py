"""``build_model``: a ready-to-train model, its tokenizer and its trainable state.

The entry point of the models layer. It resolves ``model.start_from`` (an
earlier run, :mod:`fedfm.models.chain`) and hands the concrete config to
:func:`fedfm.models.assemble.assemble_model`. Import order inside the models
layer: ``state`` <- ``assemble`` <- ``chain`` <- ``build``.
"""

from __future__ import annotations

import torch

from fedfm.config.schema import ModelConfig
from fedfm.models.assemble import FedModel, assemble_model, resolve_device
from fedfm.models.chain import resolve_start
from fedfm.models.state import load_state, set_state_


def build_model(
    cfg: ModelConfig, num_labels: int | None = None, seed: int = 0, device: str | torch.device = "cpu"
) -> FedModel:
    """Load ``cfg.name``, wrap it for ``cfg.method`` and collect its trainable state.

    ``num_labels`` is required for ``seq_cls`` and ignored for ``causal_lm``.
    ``seed`` fixes every random init made here (a new head, adapter weights,
    soft prompts) so that every process builds the same starting point; the
    global RNG state is restored afterwards. ``cfg.init_state``, when set, is
    loaded into the trainable state; ``cfg.start_from`` (an earlier run) is
    resolved first by :func:`fedfm.models.chain.resolve_start`. The model is moved to ``device`` (a
    :func:`resolve_device` name or a torch device) once built.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    cfg = resolve_start(cfg)  # model.start_from: an earlier run's base and state
    return assemble_model(cfg, num_labels, seed=seed, device=device)


def load_into_base(cfg: ModelConfig, num_labels: int | None, state_path, seed: int = 0) -> FedModel:
    """Rebuild the base model for ``cfg`` and load a saved trainable state into it."""
    state, _ = load_state(state_path)
    fm = build_model(cfg.model_copy(update={"init_state": None}), num_labels, seed=seed)
    set_state_(fm.params, state)
    return fm
