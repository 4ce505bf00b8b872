"""Byzantine-robust aggregation rules and the server fold that applies them.

Every rule is a pure function on an ``[n, d]`` float tensor ``x`` of flattened
client deltas (one row per client) and returns the robust aggregate ``[d]``:

* :func:`coordinate_median` — coordinate-wise median (Yin et al. 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
  ICML); for even ``n`` the mean of the two middle values.
* :func:`trimmed_mean` — coordinate-wise β-trimmed mean (Yin et al. 2018):
  drop the ``⌊βn⌋`` largest and smallest values of each coordinate, average
  the rest.
* :func:`krum` / :func:`multi_krum` — Krum and Multi-Krum (Blanchard et al.
  2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
  Descent", NeurIPS): score(i) = sum of squared distances from ``x_i`` to its
  ``n − f − 2`` nearest other rows; Krum returns the best-scored row,
  Multi-Krum the mean of the ``m`` best. Needs ``n > 2f + 2``.
* :func:`bulyan` — Bulyan (El Mhamdi, Guerraoui & Rouault 2018, "The Hidden
  Vulnerability of Distributed Learning in Byzantium", ICML): select
  ``θ = n − 2f`` rows by iterated Krum, then per coordinate average the
  ``β = θ − 2f`` selected values closest to their median. Needs ``n ≥ 4f + 3``.
* :func:`norm_bounded_mean` — norm bounding (Sun et al. 2019, "Can You Really
  Backdoor Federated Learning?"): clip every row to L2 norm ≤ ``M``, then the
  weighted mean.
* :func:`fltrust` — FLTrust (Cao et al. 2021, "FLTrust: Byzantine-robust
  Federated Learning via Trust Bootstrapping", NDSS): the server computes its
  own update ``g_0`` on a small root dataset; trust ``TS_i = ReLU(cos(g_i,
  g_0))``; each ``g_i`` is rescaled to ``‖g_0‖``; the aggregate is
  ``Σ TS_i ḡ_i / Σ TS_i`` (zero when every trust score is zero).

Median, trimmed mean, Krum, Multi-Krum and Bulyan ignore client weights (a
Byzantine client could lie about its example count); norm bounding uses them.

:class:`RobustFold` is the :class:`~fedfm.algorithms.base.ServerFold` wrapper.
Unlike :class:`~fedfm.algorithms.fedavg.MeanDeltaFold` it **buffers every
update of the round** (memory O(n·model)) because these rules need all updates
at once. ``finish()`` hands the robust aggregate Δ to a
:class:`~fedfm.algorithms.fedopt.ServerOptimizer` (default ``ServerSGD(1.0)``)
exactly as MeanDeltaFold does and returns the new global state with the
global keys, order and dtypes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Literal, Mapping

import torch

from fedfm.algorithms.base import ServerFold, Update
from fedfm.algorithms.fedavg import float_entries
from fedfm.algorithms.fedopt import ServerOptimizer, ServerSGD
from fedfm.errors import FedfmError

Weighting = Literal["examples", "uniform"]
Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [n, d], weights [n]) -> [d]


class RobustAggregationError(FedfmError, ValueError):
    """A robust rule cannot run with these settings (e.g. too few clients for ``f``)."""


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[0] == 0:
        raise RobustAggregationError(f"expected a non-empty [n, d] tensor of deltas, got shape {tuple(x.shape)}")


# -- rules --------------------------------------------------------------------
def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median; for even ``n`` the mean of the two middle values."""
    _check(x)
    s, n = x.sort(dim=0).values, x.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def trim_count(n: int, beta: float) -> int:
    """``⌊βn⌋``, the number of values dropped at each end by :func:`trimmed_mean`."""
    if not 0 <= beta < 0.5:
        raise RobustAggregationError(f"trim fraction must be in [0, 0.5), got {beta}")
    return int(math.floor(beta * n + 1e-9))


def trimmed_mean(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Coordinate-wise β-trimmed mean (Yin et al. 2018): drop ``⌊βn⌋`` per side."""
    _check(x)
    n = x.shape[0]
    k = trim_count(n, beta)
    if n - 2 * k <= 0:
        raise RobustAggregationError(f"trimmed mean: trimming {k} per side leaves nothing of {n} updates")
    return x.sort(dim=0).values[k : n - k].mean(dim=0)


def krum_scores(x: torch.Tensor, f: int, neighbours: int | None = None) -> torch.Tensor:
    """Krum score of every row: sum of squared distances to its ``n − f − 2`` nearest others."""
    _check(x)
    n = x.shape[0]
    k = n - f - 2 if neighbours is None else neighbours
    d2 = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    d2.fill_diagonal_(float("inf"))  # a row is not its own neighbour
    k = max(0, min(k, n - 1))
    return d2.sort(dim=1).values[:, :k].sum(dim=1)


def cohort_requirement(rule: str, n: int, f: int) -> str | None:
    """The bound on the number of updates ``n`` that ``rule`` with ``f`` attackers violates, or None.

    Krum / Multi-Krum need ``n > 2f + 2`` (Blanchard et al. 2017); Bulyan
    needs ``n >= 4f + 3`` (El Mhamdi et al. 2018); other rules have no bound.
    """
    if rule in ("krum", "multi_krum") and not n > 2 * f + 2:
        return "n > 2f + 2"
    if rule == "bulyan" and not n >= 4 * f + 3:
        return "n >= 4f + 3"
    return None


def _krum_guard(n: int, f: int, what: str) -> None:
    if f < 0:
        raise RobustAggregationError(f"{what}: num_byzantine must be >= 0, got {f}")
    if cohort_requirement("krum", n, f):
        raise RobustAggregationError(
            f"{what} needs n > 2f + 2 updates (Blanchard et al. 2017); got n={n}, f={f}"
        )


def krum_select(x: torch.Tensor, f: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` best-scored rows (ties broken by index), best first."""
    _check(x)
    n = x.shape[0]
    _krum_guard(n, f, "Krum")
    if not 1 <= m <= n:
        raise RobustAggregationError(f"Multi-Krum: m must be in [1, n={n}], got {m}")
    scores = krum_scores(x, f)
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return order[:m]


def krum(x: torch.Tensor, f: int) -> torch.Tensor:
    """Krum (Blanchard et al. 2017): the row with the lowest score."""
    return x[krum_select(x, f, 1)[0]].clone()


def multi_krum(x: torch.Tensor, f: int, m: int | None = None) -> torch.Tensor:
    """Multi-Krum: mean of the ``m`` best-scored rows (default ``m = n − f``)."""
    m = x.shape[0] - f if m is None else m
    return x[krum_select(x, f, m)].mean(dim=0)


def bulyan(x: torch.Tensor, f: int) -> torch.Tensor:
    """Bulyan (El Mhamdi et al. 2018) with Krum as the selection rule.

    Selection: ``θ = n − 2f`` times, run Krum on the rows not yet selected
    (neighbour count ``|R| − f − 2``, at least 1 — the last rounds have fewer
    rows than Krum's own bound) and move its pick to the selection. Then, per
    coordinate, average the ``β = θ − 2f`` selected values closest to the
    median of the selection.
    """
    _check(x)
    n = x.shape[0]
    if f < 0 or cohort_requirement("bulyan", n, f):
        raise RobustAggregationError(f"Bulyan needs n >= 4f + 3 updates (El Mhamdi et al. 2018); got n={n}, f={f}")
    theta, beta = n - 2 * f, n - 4 * f
    remaining, chosen = list(range(n)), []
    for _ in range(theta):
        sub = x[remaining]
        scores = krum_scores(sub, f, neighbours=max(1, len(remaining) - f - 2))
        best = min(range(len(remaining)), key=lambda i: (float(scores[i]), i))
        chosen.append(remaining.pop(best))
    sel = x[chosen]  # [θ, d]
    med = coordinate_median(sel)
    idx = (sel - med).abs().argsort(dim=0, stable=True)[:beta]  # β closest per coordinate
    return sel.gather(0, idx).mean(dim=0)


def norm_bounded_mean(x: torch.Tensor, weights: torch.Tensor, bound: float) -> torch.Tensor:
    """Norm bounding (Sun et al. 2019): scale each row to norm ≤ ``bound``, weighted mean."""
    _check(x)
    if not bound > 0:
        raise RobustAggregationError(f"norm bound must be > 0, got {bound}")
    norms = x.norm(dim=1, keepdim=True)
    clipped = x * torch.clamp(bound / norms.clamp_min(1e-30), max=1.0)
    w = weights.to(x.dtype).reshape(-1, 1)
    if float(w.sum()) <= 0:
        raise RobustAggregationError("norm bounding: weights sum to zero")
    return (clipped * w).sum(dim=0) / w.sum()


def fltrust_scores(x: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
    """FLTrust trust scores ``ReLU(cos(g_i, g_0))`` (0 for a zero ``g_i`` or ``g_0``)."""
    _check(x)
    n0, ni = g0.norm(), x.norm(dim=1)
    denom = (ni * n0).clamp_min(1e-30)
    cos = torch.where((ni > 0) & (n0 > 0), (x @ g0) / denom, torch.zeros_like(ni))
    return torch.relu(cos)


def fltrust(x: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
    """FLTrust (Cao et al. 2021): trust-weighted mean of updates rescaled to ``‖g_0‖``."""
    g0 = g0.to(x.dtype).reshape(-1)
    if g0.shape[0] != x.shape[1]:
        raise RobustAggregationError(f"FLTrust: server update has {g0.shape[0]} values, client updates {x.shape[1]}")
    ts = fltrust_scores(x, g0)
    if float(ts.sum()) <= 0:
        return torch.zeros_like(g0)
    rescaled = x * (g0.norm() / x.norm(dim=1).clamp_min(1e-30)).reshape(-1, 1)
    return (ts.reshape(-1, 1) * rescaled).sum(dim=0) / ts.sum()


# -- the fold -----------------------------------------------------------------
class RobustFold(ServerFold):
    """Buffer every float delta of the round, aggregate with ``rule``, take one server step.

    ``rule(x, weights) -> Δ`` receives the stacked flattened deltas ``[n, d]``
    (float32, float64 when the global state has a float64 tensor) and their
    weights (``"uniform"``: 1 each; ``"examples"``: ``num_examples``, and an
    update with 0 examples is skipped as in MeanDeltaFold). Non-float tensors
    keep their global value; ``finish()`` with nothing buffered returns copies
    of the global state. Inputs are never modified. ``client_ids`` lists the
    buffered clients in arrival order (row order of ``x``).

    Memory is O(n · model): robust rules need all updates at once.
    """

    def __init__(self, rule: Rule, optimizer: ServerOptimizer | None = None,
                 weighting: Weighting = "uniform", name: str = "robust") -> None:
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
        self.rule = rule
        self.optimizer = optimizer if optimizer is not None else ServerSGD(1.0)
        self.weighting = weighting
        self.name = name
        self.version = 0
        self._global: Mapping[str, torch.Tensor] | None = None
        self._float_keys: list[str] = []
        self._rows: list[torch.Tensor] = []
        self._weights: list[float] = []
        self.client_ids: list[int] = []

    @property
    def num_folded(self) -> int:
        return len(self._rows)

    def _dtype(self) -> torch.dtype:
        g = self._global
        return torch.float64 if any(g[k].dtype == torch.float64 for k in self._float_keys) else torch.float32

    def start(self, global_state: Mapping[str, torch.Tensor], version: int = 0) -> None:
        self._global = global_state
        self._float_keys = [k for k, v in global_state.items() if v.is_floating_point()]
        self._rows, self._weights, self.client_ids = [], [], []
        self.version = version

    def add(self, update: Update) -> bool:
        """Buffer one update; returns False when it was skipped (weight 0)."""
        self._require_started()
        if update.num_examples < 0:
            raise ValueError(f"client {update.client_id}: num_examples must be >= 0, got {update.num_examples}")
        w = 1.0 if self.weighting == "uniform" else float(update.num_examples)
        if w == 0:
            return False
        self._rows.append(self.flatten(update.delta, f"client {update.client_id} delta"))
        self._weights.append(w)
        self.client_ids.append(update.client_id)
        return True

    def finish(self) -> "OrderedDict[str, torch.Tensor]":
        g = self._require_started()
        try:  # the rule may still use the global state (FLTrust flattens g_0 with it)
            if not self._rows:
                return OrderedDict((k, v.detach().clone()) for k, v in g.items())
            x = torch.stack(self._rows)
            w = torch.tensor(self._weights, dtype=x.dtype)
            self._rows = []  # free the buffer before the step
            agg = self.rule(x, w)
        finally:
            self._global = None  # the round is closed; the next one needs start()
        xs, delta, offset = OrderedDict(), OrderedDict(), 0
        for k in self._float_keys:
            dt = torch.float64 if g[k].dtype == torch.float64 else torch.float32
            numel = g[k].numel()
            xs[k] = g[k].detach().to(dt)
            delta[k] = agg[offset : offset + numel].reshape(g[k].shape).to(device=g[k].device, dtype=dt)
            offset += numel
        new = self.optimizer.step(xs, delta)
        return OrderedDict((k, new[k].to(v.dtype) if k in new else v.detach().clone()) for k, v in g.items())

    def flatten(self, tensors: Mapping[str, torch.Tensor], what: str = "delta") -> torch.Tensor:
        """The float entries of ``tensors`` (global-state order) as one flat vector."""
        g = self._require_started()
        checked = float_entries(tensors, g, self._float_keys, what)
        parts = [t.reshape(-1).to(device="cpu", dtype=self._dtype()) for t in checked.values()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self._dtype())

    def _require_started(self) -> Mapping[str, torch.Tensor]:
        if self._global is None:
            raise RuntimeError("call start(global_state) before add()/finish()")
        return self._global


ServerUpdate = Callable[[Mapping[str, torch.Tensor], int], Mapping[str, torch.Tensor]]


class FLTrustFold(RobustFold):
    """FLTrust as a fold: ``server_update(global_state, version)`` returns the server's delta ``g_0``.

    It is called once per ``finish()`` (after every client update arrived)
    with the round's global state and version as given to ``start()``; the
    runtime supplies it — in a run, the same local training as the clients',
    on the server's root dataset (:func:`fedfm.server.compose.root_update`).
    After ``finish()``, ``last_trust`` holds the trust score of every
    buffered update (row order of ``client_ids``).
    """

    def __init__(self, server_update: ServerUpdate, optimizer: ServerOptimizer | None = None) -> None:
        super().__init__(self._aggregate, optimizer, "uniform", "fltrust")
        self.server_update = server_update
        self.last_trust: torch.Tensor | None = None

    def start(self, global_state: Mapping[str, torch.Tensor], version: int = 0) -> None:
        super().start(global_state, version)
        self.last_trust = None

    def _aggregate(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        g0 = self.flatten(self.server_update(self._require_started(), self.version), "server update")
        self.last_trust = fltrust_scores(x, g0.to(x.dtype))
        return fltrust(x, g0)


# -- registry -----------------------------------------------------------------
ROBUST_RULES = ("median", "trimmed_mean", "krum", "multi_krum", "bulyan", "norm_bound", "fltrust")


def build_robust_fold(
    name: str,
    optimizer: ServerOptimizer | None = None,
    *,
    num_byzantine: int = 0,
    trim_fraction: float = 0.1,
    multi_krum_m: int | None = None,
    norm_bound: float | None = None,
    server_update: ServerUpdate | None = None,
    weighting: Weighting = "uniform",
) -> RobustFold:
    """The robust fold called ``name`` (one of :data:`ROBUST_RULES`).

    ``num_byzantine`` is ``f`` for Krum/Multi-Krum/Bulyan; ``trim_fraction``
    is β per side for the trimmed mean; ``multi_krum_m`` defaults to
    ``n − f``; ``norm_bound`` (``M``) is required for ``norm_bound``;
    ``server_update(global_state, version) -> delta`` (the server's update
    on its root data) is required for ``fltrust``. ``weighting`` only matters
    for ``norm_bound`` (the other rules ignore weights).
    """
    if num_byzantine < 0:
        raise FedfmError(f"robust.num_byzantine must be >= 0, got {num_byzantine}")
    f = int(num_byzantine)
    if name == "median":
        rule: Rule = lambda x, w: coordinate_median(x)
    elif name == "trimmed_mean":
        trim_count(10, trim_fraction)  # validates the fraction now
        rule = lambda x, w: trimmed_mean(x, trim_fraction)
    elif name == "krum":
        rule = lambda x, w: krum(x, f)
    elif name == "multi_krum":
        if multi_krum_m is not None and multi_krum_m < 1:
            raise FedfmError(f"robust.multi_krum_m must be >= 1, got {multi_krum_m}")
        rule = lambda x, w: multi_krum(x, f, multi_krum_m)
    elif name == "bulyan":
        rule = lambda x, w: bulyan(x, f)
    elif name == "norm_bound":
        if norm_bound is None or not norm_bound > 0:
            raise FedfmError(f"robust rule 'norm_bound' needs robust.norm_bound > 0, got {norm_bound}")
        bound = float(norm_bound)
        rule = lambda x, w: norm_bounded_mean(x, w, bound)
    elif name == "fltrust":
        if server_update is None:
            raise FedfmError("robust rule 'fltrust' needs a server_update callable (the server's root-data update)")
        return FLTrustFold(server_update, optimizer)
    else:
        raise FedfmError(f"unknown robust aggregation rule {name!r}; choose one of: {', '.join(ROBUST_RULES)}")
    return RobustFold(rule, optimizer, weighting, name)
