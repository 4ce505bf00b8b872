"""Staleness weights for asynchronous aggregation.

An update computed from global version ``v`` that arrives when the server is
at version ``t`` has staleness ``tau = t - v`` and is down-weighted by
``s(tau)``:

* ``polynomial``: ``s(tau) = (1 + tau) ** -a`` -- FedAsync (Xie et al. 2019,
  "Asynchronous Federated Optimization") and FedBuff (Nguyen et al. 2022,
  "Federated Learning with Buffered Asynchronous Aggregation"), which uses
  ``a = 0.5``;
* ``hinge``: ``s(tau) = 1`` for ``tau <= b``, else ``1 / (a (tau - b) + 1)`` (FedAsync);
* ``constant``: ``s(tau) = 1``.
"""

from __future__ import annotations


def staleness_weight(tau: int, kind: str = "polynomial", exponent: float = 0.5, hinge_a: float = 10.0,
                     hinge_b: int = 4) -> float:
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + tau) ** -exponent)
    if kind == "hinge":
        return 1.0 if tau <= hinge_b else 1.0 / (hinge_a * (tau - hinge_b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}")
