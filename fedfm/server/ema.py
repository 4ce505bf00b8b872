"""An exponential moving average of the global versions: the model the server releases when on."""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch


class Ema:
    """``algorithm.ema_decay``: fold every new global version into a running average (once per version).

    ``decay_t = min(decay, (1 + t) / (10 + t))`` for the t-th version, the
    warm-up of TensorFlow's ExponentialMovingAverage, so the average does not
    cling to the initial model; averaging released DP models is
    post-processing and costs no privacy (De et al. 2022, "Unlocking
    High-Accuracy Differentially Private Image Classification through Scale").
    """

    def __init__(self, decay: float = 0.0) -> None:
        self.decay = float(decay)
        self.state: "OrderedDict[str, torch.Tensor] | None" = None
        self.version = 0  # the newest version folded in

    def update(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        if self.decay <= 0 or version == self.version:
            return
        self.version = version
        if self.state is None:
            self.state = OrderedDict((k, v.detach().clone()) for k, v in state.items())
            return
        d = min(self.decay, (1 + version) / (10 + version))
        self.state = OrderedDict(
            (k, (e * d + state[k] * (1 - d)).to(e.dtype) if e.is_floating_point() else state[k].clone())
            for k, e in self.state.items()
        )
