"""Client-side error feedback for biased codecs (top-k, and any lossy chain).

EF-SGD (Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with memory";
Karimireddy et al. 2019, "Error feedback fixes SignSGD"): the client codes
``x = delta + e`` instead of ``delta`` and keeps the error
``e' = x - decode(encode(x))`` for its next participation, so nothing it
ever computed is lost, only delayed. The residual ``e`` lives in the
client's private ``Client.state`` under :data:`RESIDUAL_KEY` and never
travels.
"""

from __future__ import annotations

from typing import Mapping

import torch

RESIDUAL_KEY = "compression_residual"


def with_residual(name: str, delta: torch.Tensor, client_state: dict) -> torch.Tensor:
    """``delta + e`` (``delta`` itself when the client holds no residual for ``name``)."""
    e = client_state.get(RESIDUAL_KEY, {}).get(name)
    if e is None or e.shape != delta.shape:
        return delta.to(torch.float32)
    return delta.to(torch.float32) + e


def keep_residual(name: str, x: torch.Tensor, decoded: torch.Tensor, client_state: dict) -> None:
    """Store ``e' = x - decoded`` for the client's next upload."""
    client_state.setdefault(RESIDUAL_KEY, {})[name] = (x - decoded).detach().clone()


def residual_norm(client_states: Mapping[int, dict] | list[dict]) -> float:
    """L2 norm of all residuals held by the clients (a diagnostic)."""
    states = client_states.values() if isinstance(client_states, Mapping) else client_states
    sq = sum(float(e.double().pow(2).sum()) for s in states for e in s.get(RESIDUAL_KEY, {}).values())
    return sq**0.5
