"""Models layer: load a foundation model, wrap it for a method, read/write its trainable state.

Public API::

    fm = build_model(cfg.model, num_labels=5, seed=0)   # FedModel
    state = get_state(fm.params)                        # detached CPU copies
    set_state_(fm.params, state)                        # in place, between clients
    save_state(state, "final.safetensors"); load_state("final.safetensors")
    state_to_bytes(state) / state_from_bytes(b)         # the wire format (safetensors)
    load_into_base(cfg.model, 5, "final.safetensors")   # base model + saved state
"""

from fedfm.models.assemble import FedModel, resolve_device, short_name, trainable_params
from fedfm.models.build import build_model, load_into_base
from fedfm.models.registry import ALIASES, cache_root, resolve
from fedfm.models.state import (
    get_state,
    load_state,
    save_state,
    set_state_,
    state_from_bytes,
    state_nbytes,
    state_to_bytes,
)

__all__ = [
    "ALIASES",
    "FedModel",
    "build_model",
    "cache_root",
    "get_state",
    "load_into_base",
    "load_state",
    "resolve",
    "resolve_device",
    "save_state",
    "set_state_",
    "short_name",
    "state_from_bytes",
    "state_nbytes",
    "state_to_bytes",
    "trainable_params",
]
