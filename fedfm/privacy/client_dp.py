"""Client-level differential privacy for the FedAvg family: DP-FedAvg with optional adaptive clipping.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially
Private Recurrent Language Models", ICLR). Each round:

1. ``add``: clip every client's whole update delta (all float tensors of the
   trainable state *jointly*) to L2 norm ``C`` and add it to a running sum
   with weight 1;
2. ``finish``: add Gaussian noise ``N(0, (σ_Δ C)² I)`` to the sum, divide by
   the expected cohort size ``m`` (``denominator="expected"``: the fixed-
   denominator unbiased estimator of the paper, whose sensitivity is ``C/m``)
   or by the actual number of updates (``"actual"``: lower variance, but the
   count itself is then released unnoised — not covered by the accountant),
   and hand the noised mean to the algorithm's own fold as its one update, so
   its :class:`~fedfm.algorithms.fedopt.ServerOptimizer` steps on it (FedAvg,
   FedAvgM, FedAdam ... all become their DP variants; the optimizer is
   post-processing). The DP fold *wraps* the algorithm's fold, it does not
   replace it.

Why uniform weights: the privacy guarantee needs a bound on how much one
client can change the released sum. With weight 1 and clipping to ``C``, adding
or removing one client moves the sum by at most ``C``. Example-count weights
would make that bound depend on the client's (private, unbounded) example
count, so the noise ``σC`` would no longer hide a client. (McMahan et al.
allow capped weights; we keep weight 1, their ``w_k = 1`` case.)

Adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially
Private Learning with Adaptive Clipping", NeurIPS): the clip norm tracks the
``γ``-quantile of update norms. Each client contributes the bit
``b_i = [‖Δ_i‖ ≤ C]``; the server releases the noised fraction
``b̄ = 1/2 + (Σ_i (b_i − 1/2) + N(0, σ_b²)) / m`` (centred bits, sensitivity 1/2)
and updates geometrically ``C ← C · exp(−η_C (b̄ − γ))``. The two releases
share the budget: with total noise multiplier ``z`` the update sum uses
``σ_Δ = (z^{-2} − (2σ_b)^{-2})^{-1/2}`` (Andrew et al., Thm. 1), so the pair
is exactly as private as one Gaussian mechanism with multiplier ``z`` and the
accountant runs with ``z``. Needs ``2σ_b > z``; the default
``σ_b = m / 20`` is the paper's recommendation. The round that clips with
``C_t`` also produces ``C_{t+1}``.

Randomness (:mod:`fedfm.privacy.noise`): by default the update noise and the
adaptive-clipping bit noise of a round come from a ``torch.Generator`` seeded
afresh every round from OS entropy (:mod:`secrets`), so nobody who knows the
run's config or checkpoints can reconstruct the noise. ``reproducible=True``
(config ``privacy.reproducible_noise: true``) seeds it from ``(seed, round)``
instead (round = number of ``finish`` calls, kept in ``state_dict``): reruns
and resumes are bit-identical and no two rounds share noise, which is what
research simulations want, but the noise is then known to anyone with the
config: **not private**. Either way torch's PRNG is not cryptographically
secure and floating-point Gaussian sampling has known leaks (Mironov 2012); a
deployment facing a strong adversary should use a vetted secure sampler
(e.g. a discrete Gaussian). Simulation workers agree on a round's entropy
seed through :meth:`ClientDPFold.partial` / :meth:`ClientDPFold.merge`, so
they all finish with the same noise.

Noise is added even when no update arrived in a round: skipping it would
reveal that the cohort was empty.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Literal, Mapping

import torch

from fedfm.algorithms.base import Algorithm, ServerFold, Update
from fedfm.algorithms.fedavg import MeanDeltaFold, StartedFold
from fedfm.privacy.noise import joint_seed, noise_generator, seed_shares

Denominator = Literal["expected", "actual"]


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all floating-point tensors taken together (computed in float64)."""
    total = 0.0
    for t in tensors.values():
        if t.is_floating_point():
            total += float(t.detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def clip_by_global_norm(
    delta: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple["OrderedDict[str, torch.Tensor]", float]:
    """Scale all float tensors jointly so their global L2 norm is at most ``clip_norm``.

    Returns ``(clipped, norm)`` where ``norm`` is the norm *before* clipping.
    Factor ``min(1, C / norm)``; updates already within the norm are returned
    unchanged (as copies). Non-float tensors are passed through and do not count
    toward the norm. Inputs are not modified; dtypes are kept.
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm}")
    norm = global_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = OrderedDict()
    for k, t in delta.items():
        if t.is_floating_point() and factor < 1.0:
            out[k] = (t.detach().to(torch.float64) * factor).to(t.dtype)
        else:
            out[k] = t.detach().clone()
    return out, norm


def _round_seed(seed: int, round_index: int) -> int:
    digest = hashlib.sha256(f"fedfm.client_dp:{seed}:{round_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ClientDPFold(StartedFold):
    """DP-FedAvg around the algorithm's fold: clip in ``add``, noise in ``finish``, then the inner fold steps.

    Args:
        inner: the algorithm's own fold (a :class:`MeanDeltaFold`): it receives the
            noised mean as its one update and takes its server-optimizer step.
        clip_norm: ``C`` (the initial value when ``adaptive``).
        noise_multiplier: ``z``, total noise multiplier (what the accountant uses).
        expected_clients: ``m``, the expected cohort size (``q · N``).
        denominator: ``"expected"`` (divide by ``m``) or ``"actual"`` (by the count).
        adaptive: track the ``target_quantile`` of update norms (Andrew et al. 2021).
        target_quantile: ``γ`` in (0, 1).
        clip_lr: ``η_C`` > 0, the geometric clip-norm learning rate.
        clipped_count_stddev: ``σ_b``; default ``m / 20`` when adaptive and z > 0.
        seed: the run seed; the noise derives from it only when ``reproducible``.
        reproducible: derive each round's noise from ``(seed, round)`` (research
            only: not private against anyone who has the config) instead of OS
            entropy (the default; see the module docstring).

    After each ``finish``, ``last_round`` holds the stats of that round.
    """

    def __init__(
        self,
        inner: ServerFold | None = None,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        expected_clients: float = 1.0,
        denominator: Denominator = "expected",
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
        seed: int = 0,
        reproducible: bool = False,
    ) -> None:
        self.inner = inner if inner is not None else MeanDeltaFold()
        self._global: Mapping[str, torch.Tensor] | None = None
        if not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm}")
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
        if not expected_clients > 0:
            raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
        if denominator not in ("expected", "actual"):
            raise ValueError(f"denominator must be 'expected' or 'actual', got {denominator!r}")
        if not 0 < target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile}")
        if not clip_lr > 0:
            raise ValueError(f"clip_lr must be > 0, got {clip_lr}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_clients = float(expected_clients)
        self.denominator = denominator
        self.adaptive = bool(adaptive)
        self.target_quantile = float(target_quantile)
        self.clip_lr = float(clip_lr)
        self.seed = int(seed)
        self.reproducible = bool(reproducible)
        self.rounds = 0  # finish() calls so far: the noise stream index when reproducible
        self.last_round: dict[str, float] = {}

        z = self.noise_multiplier
        if not self.adaptive:
            self.clipped_count_stddev = 0.0
            self.delta_noise_multiplier = z
        else:
            sb = self.expected_clients / 20.0 if clipped_count_stddev is None else float(clipped_count_stddev)
            if sb < 0:
                raise ValueError(f"clipped_count_stddev must be >= 0, got {sb}")
            if z == 0:
                self.delta_noise_multiplier = 0.0  # no privacy asked for: no split needed
            elif 2 * sb <= z:
                raise ValueError(
                    f"adaptive clipping needs 2·clipped_count_stddev > noise_multiplier "
                    f"(got σ_b={sb}, z={z}); increase clipped_count_stddev"
                )
            else:
                self.delta_noise_multiplier = (z**-2 - (2 * sb) ** -2) ** -0.5
            self.clipped_count_stddev = sb

    # -- the fold -----------------------------------------------------------
    def start(self, global_state: Mapping[str, torch.Tensor], version: int = 0) -> None:
        self.inner.start(global_state, version)
        self._global = global_state
        self._float_keys = [k for k, v in global_state.items() if v.is_floating_point()]
        self._count = 0
        self._sums: OrderedDict[str, torch.Tensor] | None = None
        self._norm_sum = 0.0
        self._norm_max = 0.0
        self._num_clipped = 0  # ‖Δ‖ > C
        self._num_within = 0  # ‖Δ‖ ≤ C: Σ b_i for adaptive clipping
        self._joint_seed: int | None = None  # simulation workers' common entropy seed (merge)

    def add(self, update: Update) -> bool:
        """Clip the whole float delta jointly to ``C`` and add it with weight 1."""
        g = self._require_started()
        if update.num_examples < 0:  # the weight is 1 regardless
            raise ValueError(f"client {update.client_id}: num_examples must be >= 0, got {update.num_examples}")
        part = self._float_part(update.delta, g, f"client {update.client_id} delta")
        norm = global_norm(part)
        if not math.isfinite(norm):
            raise ValueError(f"client {update.client_id} delta has a non-finite norm")
        factor = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        if self._sums is None:
            self._sums = OrderedDict((k, torch.zeros_like(g[k], dtype=torch.float64)) for k in self._float_keys)
        for k, acc in self._sums.items():
            acc.add_(part[k].to(device=acc.device, dtype=torch.float64), alpha=factor)
        self._count += 1
        self._norm_sum += norm
        self._norm_max = max(self._norm_max, norm)
        if norm <= self.clip_norm:
            self._num_within += 1
        else:
            self._num_clipped += 1
        return True

    def summand(self, update: Update, max_weight: float = 1.0) -> tuple["OrderedDict[str, torch.Tensor]", list[float]]:
        """A client's contribution to a secure sum: ``(clip_C(Δ), [1, b])`` with ``b = [‖Δ‖ ≤ C]``.

        Clipping moves to the client (``C`` is public: it is broadcast each
        round); the server sees only the sum, adds the noise in ``finish`` and
        never holds an unnoised individual update. ``max_weight`` is unused:
        every client weighs 1 under DP.
        """
        g = self._require_started()
        part = self._float_part(update.delta, g, f"client {update.client_id} delta")
        clipped, norm = clip_by_global_norm(part, self.clip_norm)
        if not math.isfinite(norm):
            raise ValueError(f"client {update.client_id} delta has a non-finite norm")
        within = 1.0 if norm <= self.clip_norm else 0.0
        return OrderedDict((k, t.to(torch.float64)) for k, t in clipped.items()), [1.0, within]

    def summand_layout(self, clip_range: float) -> tuple[float, int]:
        """Range ``C`` (lossless: every coordinate of a clipped vector is within C) and ``[1, b]``."""
        return self.clip_norm, 2

    def absorb_sum(self, tensors: "OrderedDict[str, torch.Tensor]", scalars: list[float], count: int) -> None:
        """Take the secure sum of the cohort's summands; per-client norms stay unknown (NaN in the stats)."""
        self._require_started()
        self._sums = OrderedDict((k, tensors[k].to(torch.float64)) for k in self._float_keys)
        self._count = int(count)
        self._num_within = round(float(scalars[1]))
        self._num_clipped = int(count) - self._num_within
        self._norm_sum = self._norm_max = math.nan

    def partial(self) -> tuple["OrderedDict[str, torch.Tensor]", list[float]]:
        """This worker's sum of clipped deltas, its clipping counters and its share of the noise seed.

        Multi-process simulation: the shares (fresh OS entropy, two scalars) let every
        worker derive the same entropy seed in :meth:`merge`, hence the same noise.
        """
        g = self._require_started()
        sums = self._sums or {}
        tensors = OrderedDict((k, sums[k] if k in sums else torch.zeros(g[k].shape, dtype=torch.float64))
                              for k in self._float_keys)
        return tensors, [float(self._count), self._norm_sum, self._norm_max, float(self._num_within),
                         float(self._num_clipped), *seed_shares()]

    def merge(self, sums: "OrderedDict[str, torch.Tensor]", scalars: list[list[float]]) -> None:
        """The cohort's summed clipped deltas and counters; the noise is added once, in ``finish``.

        Every worker merges the same scalars, so all seed this round's noise alike.
        """
        self._require_started()
        self._sums = OrderedDict((k, sums[k]) for k in self._float_keys)
        self._count = int(sum(s[0] for s in scalars))
        self._norm_sum = float(sum(s[1] for s in scalars))
        self._norm_max = float(max(s[2] for s in scalars))
        self._num_within = int(sum(s[3] for s in scalars))
        self._num_clipped = int(sum(s[4] for s in scalars))
        self._joint_seed = joint_seed(x for s in scalars for x in s[5:])

    def finish(self) -> "OrderedDict[str, torch.Tensor]":
        g = self._require_started()
        self._global = None
        n = self._count
        gen = self._generator()
        C = self.clip_norm
        sum_std = self.delta_noise_multiplier * C
        denom = self.expected_clients if self.denominator == "expected" else float(max(n, 1))

        mean = OrderedDict()
        for k in self._float_keys:
            s = self._sums[k] if self._sums is not None else torch.zeros(g[k].shape, dtype=torch.float64)
            s = s.cpu()
            if sum_std > 0:
                s = s + torch.normal(0.0, sum_std, size=tuple(s.shape), generator=gen, dtype=torch.float64)
            mean[k] = s / denom
        if self._float_keys:  # the noised mean is the inner fold's one update: its server optimizer steps on it
            self.inner.add(Update(client_id=-1, delta=mean, num_examples=1))

        stats = {
            "clip_norm": C,
            "num_clients": float(n),
            "mean_update_norm": self._norm_sum / n if n else 0.0,
            "max_update_norm": self._norm_max,
            "fraction_clipped": self._num_clipped / n if n else 0.0,
            "noise_std": sum_std / denom,  # per coordinate, on the mean
            "noise_multiplier": self.noise_multiplier,
            "delta_noise_multiplier": self.delta_noise_multiplier,
            "denominator": denom,
        }
        if self.adaptive:
            noisy = self._num_within - n / 2.0
            if self.clipped_count_stddev > 0 and self.noise_multiplier > 0:
                noisy += float(torch.normal(0.0, self.clipped_count_stddev, size=(1,), generator=gen, dtype=torch.float64))
            b_bar = 0.5 + noisy / self.expected_clients
            self.clip_norm = C * math.exp(-self.clip_lr * (b_bar - self.target_quantile))
            stats["unclipped_fraction_estimate"] = b_bar
            stats["next_clip_norm"] = self.clip_norm
        self.last_round = stats
        self.rounds += 1
        return self.inner.finish()

    @property
    def num_folded(self) -> int:
        return self._count

    def round_stats(self) -> dict:
        """The last round's clipping and noise statistics (``dp_*`` in the metrics log)."""
        return {f"dp_{k}": v for k, v in self.last_round.items() if isinstance(v, (int, float))}

    # -- state --------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        """This round's noise generator: from ``(seed, round)`` when reproducible, else from OS entropy.

        The entropy is this process's own, or the workers' joint seed after :meth:`merge`.
        """
        if self.reproducible:
            return noise_generator(_round_seed(self.seed, self.rounds))
        return noise_generator(self._joint_seed)

    def state_dict(self, tensors: dict | None = None, orders: dict | None = None) -> dict:
        """The round count and the (adaptive) clip norm; the wrapped fold keeps its own state.

        No generator state: without ``reproducible`` each round's seed came from OS
        entropy and was never stored, so a checkpoint cannot reconstruct past noise.
        """
        return {"clip_norm": self.clip_norm, "rounds": self.rounds}

    def load_state_dict(self, state: dict, tensors=None, orders=None) -> None:
        self.clip_norm = float(state["clip_norm"])
        self.rounds = int(state["rounds"])


def with_client_dp(algorithm: Algorithm, **dp_kwargs) -> Algorithm:
    """Make a FedAvg-family algorithm (FedAvg, FedOpt variants, FedProx) its DP-FedAvg variant.

    Wraps ``algorithm.fold`` (a plain :class:`MeanDeltaFold`) in a
    :class:`ClientDPFold`, which hands it the noised mean each round (so its
    server optimizer and that optimizer's state serve as before); the client
    hook is untouched. ``dp_kwargs`` go to :class:`ClientDPFold`.
    Returns the same algorithm object. SCAFFOLD is refused: its control-variate
    deltas travel unclipped and unnoised, so it would not be private.
    """
    fold = algorithm.fold
    if type(fold) is not MeanDeltaFold:
        raise ValueError(
            f"client-level DP supports the FedAvg family (MeanDeltaFold); "
            f"{algorithm.name!r} uses {type(fold).__name__}"
        )
    algorithm.fold = ClientDPFold(fold, **dp_kwargs)
    return algorithm
