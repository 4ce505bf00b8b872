"""FedAvg and the fold every algorithm here shares.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS): clients run local SGD from the
global model; the server replaces it with the example-weighted mean of the
client models, i.e. ``x ← x + η Σ n_i Δ_i / Σ n_i`` with server lr ``η = 1``.

:class:`MeanDeltaFold` folds client deltas into a running weighted mean
(O(model) memory, float64 sums, so arrival order does not matter) and hands
the mean ``Δ`` to a :class:`~fedfm.algorithms.fedopt.ServerOptimizer`. With
:class:`~fedfm.algorithms.fedopt.ServerSGD` that is FedAvg; with
FedAvgM/FedAdam/FedYogi/FedAdagrad it is the FedOpt family; FedProx and
SCAFFOLD reuse it with their own client hooks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch

from fedfm.algorithms.base import Algorithm, RunningWeightedMean, ServerFold, Update
from fedfm.algorithms.fedopt import (
    AdaptiveOptions,
    DiLoCoOptions,
    MomentumOptions,
    ServerAdagrad,
    ServerAdam,
    ServerAvgM,
    ServerNesterov,
    ServerOptimizer,
    ServerSGD,
    ServerYogi,
)
from fedfm.data.quality import kept_fraction
from fedfm.registry import (
    ALGORITHMS,
    ASYNC_SAFE,
    DELTA_ONLY,
    EXAMPLE_SCALED,
    MEAN_DELTA,
    MERGEABLE,
    PLAIN_CLIENT,
    SECURE_SUM,
    SGD_SERVER_STEP,
    WEIGHTINGS,
)

Weighting = str  # a name registered in WEIGHTINGS: "examples", "uniform", "quality"


# -- client weightings (``algorithm.weighting``): an update's weight in the fold's mean ---------------
@WEIGHTINGS.register("examples", capabilities={EXAMPLE_SCALED},
                     summary="the client's training examples (FedAvg, McMahan et al. 2017)")
def examples_weight(update: Update) -> float:
    return float(update.num_examples)


@WEIGHTINGS.register("uniform", summary="1 per client")
def uniform_weight(update: Update) -> float:
    return 1.0


@WEIGHTINGS.register("quality", capabilities={EXAMPLE_SCALED},
                     summary="examples x the fraction of its rows the client kept (data.quality; FedDQC, Du et al. 2024)")
def quality_weight(update: Update) -> float:
    """``num_examples * kept / rows``: examples scaled by the client's data-quality score.

    The score is the fraction of its training rows the client's own
    ``data.quality`` filters kept (:func:`fedfm.data.quality.kept_fraction`),
    reported as counts in the update's metrics and checked by the server: it is
    computed without the server seeing any row. A client that had to drop much
    of its data is likely to hold more bad rows the filters missed, so it counts
    less than its kept examples alone would say -- quality-aware aggregation as
    in FedDQC (Du et al. 2024, "Data Quality Control in Federated
    Instruction-tuning of Large Language Models", arXiv:2410.11540).
    """
    if update.num_examples == 0:
        return 0.0
    return float(update.num_examples) * kept_fraction(update.metrics, update.client_id)

# FedAvg's fold on a plain client: everything the runtimes offer (see fedfm.registry).
FEDAVG_CAPABILITIES = frozenset({MERGEABLE, SECURE_SUM, ASYNC_SAFE, MEAN_DELTA, PLAIN_CLIENT, DELTA_ONLY})


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class StartedFold(ServerFold):
    """A fold that holds the round's global state from ``start`` to ``finish`` and checks updates against it."""

    _global: Mapping[str, torch.Tensor] | None = None
    _float_keys: list[str] = []

    def _require_started(self) -> Mapping[str, torch.Tensor]:
        if self._global is None:
            raise RuntimeError("call start(global_state) before add()/finish()")
        return self._global

    def _float_part(self, tensors: Mapping[str, torch.Tensor], g: Mapping[str, torch.Tensor], what: str):
        return float_entries(tensors, g, self._float_keys, what)


class MeanDeltaFold(StartedFold):
    """Weighted mean of client deltas, then one server-optimizer step.

    * ``weighting="examples"``: weight = ``update.num_examples``; an update
      with 0 examples has weight 0 and is skipped (not counted).
    * ``weighting="uniform"``: every update has weight 1.
    * ``weighting="quality"``: examples x the client's kept fraction (:func:`quality_weight`);
      any other name registered in ``WEIGHTINGS`` works the same way.
    * Only floating-point tensors are averaged and stepped; any other tensor
      (integer buffers, masks) keeps its global value.
    * ``finish()`` with nothing folded returns copies of the global state and
      leaves the optimizer state untouched.

    The tensors passed to ``start`` and ``add`` are never modified; ``finish``
    returns new tensors with the keys, order and dtypes of the global state.
    """

    def __init__(self, optimizer: ServerOptimizer | None = None, weighting: Weighting = "examples") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS.names())}, got {weighting!r}")
        self.optimizer = optimizer if optimizer is not None else ServerSGD(1.0)
        self.weighting = weighting
        self._weigh = WEIGHTINGS.get(weighting)
        self.version = 0
        self._global: Mapping[str, torch.Tensor] | None = None
        self._float_keys: list[str] = []
        self._mean = RunningWeightedMean()

    # -- the fold -----------------------------------------------------------
    def start(self, global_state: Mapping[str, torch.Tensor], version: int = 0) -> None:
        self._global = global_state
        self._float_keys = [k for k, v in global_state.items() if v.is_floating_point()]
        self._mean = RunningWeightedMean()
        self.version = version

    @property
    def num_folded(self) -> int:
        """Updates folded this round (zero-weight updates are not counted)."""
        return self._mean.count

    def weight(self, update: Update) -> float:
        if update.num_examples < 0:
            raise ValueError(f"client {update.client_id}: num_examples must be >= 0, got {update.num_examples}")
        return float(self._weigh.obj(update))

    def add(self, update: Update) -> bool:
        """Fold one update; returns False when it was skipped (weight 0)."""
        g = self._require_started()
        w = self.weight(update)
        if w == 0:
            return False
        self._mean.add(self._float_part(update.delta, g, f"client {update.client_id} delta"), w)
        return True

    # -- secure aggregation: the server sees only the sum of summands ----------
    def summand(self, update: Update, max_weight: float) -> tuple["OrderedDict[str, torch.Tensor]", list[float]]:
        """What one client contributes to a secure sum (computed on the client, public parameters only).

        Returns ``(r·Δ, [r])`` with ``r = min(weight / max_weight, 1)``: the sum of
        summands over the cohort is ``(Σ r_i Δ_i, Σ r_i)``, whose ratio is this
        fold's weighted mean (the capped weights of Flower's SecAgg+ workflow; an
        update with more than ``max_weight`` examples counts as ``max_weight``).
        """
        g = self._require_started()
        w = self.weight(update)
        r = min(w / max_weight, 1.0) if self._weigh.supports(EXAMPLE_SCALED) else w
        part = self._float_part(update.delta, g, f"client {update.client_id} delta")
        return OrderedDict((k, t.to(torch.float64) * r) for k, t in part.items()), [r]

    def summand_layout(self, clip_range: float) -> tuple[float, int]:
        """(public value range of the summand's tensors, number of its scalars): ``R`` and ``[r]``."""
        return float(clip_range), 1

    def absorb_sum(self, tensors: "OrderedDict[str, torch.Tensor]", scalars: list[float], count: int) -> None:
        """Take the cohort's securely summed summands in place of ``count`` calls to ``add``."""
        self._require_started()
        self._mean = RunningWeightedMean()
        self._mean.sums = OrderedDict((k, tensors[k].to(torch.float64)) for k in self._float_keys)
        self._mean.total_weight = float(scalars[0])
        self._mean.count = int(count)

    # -- multi-process simulation: each worker folds its share, the sums are added ----
    def partial(self) -> tuple["OrderedDict[str, torch.Tensor]", list[float]]:
        """This worker's running sums (float64; zeros when it folded nothing) and scalars.

        The tensors of all workers are summed (an all-reduce) and handed to
        :meth:`merge` with every worker's scalars; the result equals folding
        every update in one process, up to float64 rounding.
        """
        g = self._require_started()
        sums = self._mean.sums or {}
        return (OrderedDict((k, sums[k] if k in sums else torch.zeros(g[k].shape, dtype=torch.float64))
                            for k in self._float_keys), [self._mean.total_weight, float(self._mean.count)])

    def merge(self, sums: "OrderedDict[str, torch.Tensor]", scalars: list[list[float]]) -> None:
        """Install the workers' summed ``partial`` tensors and every worker's scalars."""
        self._require_started()
        self._mean = RunningWeightedMean()
        self._mean.sums = OrderedDict((k, sums[k]) for k in self._float_keys)
        self._mean.total_weight = float(sum(s[0] for s in scalars))
        self._mean.count = int(sum(s[1] for s in scalars))

    def finish(self) -> "OrderedDict[str, torch.Tensor]":
        g = self._require_started()
        self._global = None  # the round is closed; the next one needs start()
        if self._mean.count == 0 or self._mean.total_weight <= 0:
            return OrderedDict((k, v.detach().clone()) for k, v in g.items())
        x, mean = OrderedDict(), OrderedDict()
        for k in self._float_keys:
            dt = compute_dtype(g[k].dtype)
            x[k] = g[k].detach().to(dt)
            mean[k] = (self._mean.sums[k] / self._mean.total_weight).to(device=g[k].device, dtype=dt)
        new = self.optimizer.step(x, mean)
        return OrderedDict(
            (k, new[k].to(v.dtype) if k in new else v.detach().clone()) for k, v in g.items()
        )

    # -- state across rounds (checkpoints) ------------------------------------
    def state_dict(self, tensors: dict, orders: dict) -> dict:
        """The server optimizer's moments (``server_opt/<slot>/<name>``) and their layout."""
        opt = self.optimizer
        meta = {"optimizer": type(opt).__name__, "names": list(opt.state.keys()), "slots": {}}
        for name, slot in opt.state.items():
            meta["slots"][name] = list(slot.keys())
            for k, t in slot.items():
                tensors[f"server_opt/{k}/{name}"] = t.detach().to("cpu").contiguous().clone()
        return meta

    def load_state_dict(self, meta: dict, tensors: Mapping[str, torch.Tensor], orders: dict) -> None:
        if meta["optimizer"] != type(self.optimizer).__name__:
            raise ValueError(f"state of a {meta['optimizer']} server optimizer, this fold has a "
                             f"{type(self.optimizer).__name__}")
        self.optimizer.state.clear()
        for name in meta["names"]:
            self.optimizer.state[name] = {k: tensors[f"server_opt/{k}/{name}"] for k in meta["slots"][name]}


def float_entries(
    tensors: Mapping[str, torch.Tensor], g: Mapping[str, torch.Tensor], float_keys: list[str], what: str
) -> "OrderedDict[str, torch.Tensor]":
    """The ``float_keys`` entries of ``tensors``, checked against the global state ``g``."""
    unknown = [k for k in tensors if k not in g]
    if unknown:
        raise ValueError(f"{what} has tensors not in the global state: {unknown[:5]}")
    out = OrderedDict()
    for k in float_keys:
        if k not in tensors:
            raise ValueError(f"{what} is missing tensor {k!r}")
        t = tensors[k]
        if t.shape != g[k].shape:
            raise ValueError(f"{what}: {k!r} has shape {tuple(t.shape)}, expected {tuple(g[k].shape)}")
        out[k] = t.detach()
    return out


class FedAvg(Algorithm):
    """FedAvg (McMahan et al. 2017); with ``server_opt`` any FedOpt variant.

    Client side: plain local training (the default no-op hook). Server side:
    :class:`MeanDeltaFold` with ``server_opt`` (default ``ServerSGD(server_lr)``).
    """

    name = "fedavg"

    def __init__(
        self,
        server_lr: float = 1.0,
        weighting: Weighting = "examples",
        server_opt: ServerOptimizer | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(MeanDeltaFold(server_opt or ServerSGD(server_lr), weighting))
        if name is not None:
            self.name = name


# -- registered algorithms: FedAvg and FedAvg with another server optimizer (the FedOpt family) -------
@ALGORITHMS.register("fedavg", capabilities=FEDAVG_CAPABILITIES | {SGD_SERVER_STEP},
                     summary="FedAvg (McMahan et al. 2017): weighted mean of client deltas, server SGD")
def _fedavg(cfg, num_clients: int) -> FedAvg:
    return FedAvg(weighting=cfg.weighting, server_opt=ServerSGD(cfg.server_lr), name="fedavg")


@ALGORITHMS.register("fedavgm", config=MomentumOptions, capabilities=FEDAVG_CAPABILITIES,
                     summary="FedAvgM (Hsu et al. 2019): server momentum")
def _fedavgm(cfg, num_clients: int) -> FedAvg:
    return FedAvg(weighting=cfg.weighting, server_opt=ServerAvgM(cfg.server_lr, cfg.momentum), name="fedavgm")


@ALGORITHMS.register("diloco", config=DiLoCoOptions, capabilities=FEDAVG_CAPABILITIES,
                     summary="DiLoCo (Douillard et al. 2023): Nesterov outer optimizer, outer lr 0.7")
def _diloco(cfg, num_clients: int) -> FedAvg:
    return FedAvg(weighting=cfg.weighting, server_opt=ServerNesterov(cfg.server_lr, cfg.momentum), name="diloco")


def _adaptive(name: str, opt: type[ServerOptimizer], summary: str) -> None:
    def factory(cfg, num_clients: int) -> FedAvg:
        return FedAvg(weighting=cfg.weighting, server_opt=opt(cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau), name=name)

    ALGORITHMS.add(name, factory, config=AdaptiveOptions, capabilities=FEDAVG_CAPABILITIES, summary=summary)


_adaptive("fedadam", ServerAdam, "FedAdam (Reddi et al. 2021)")
_adaptive("fedyogi", ServerYogi, "FedYogi (Reddi et al. 2021)")
_adaptive("fedadagrad", ServerAdagrad, "FedAdagrad (Reddi et al. 2021)")
