"""Compose the server side of a run from the config: algorithm + privacy fold + accountant.

Privacy and robustness are folds that wrap or replace the algorithm's own
fold; this is the one place that decides which, so no algorithm carries a
special case for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedfm.algorithms.base import Algorithm
from fedfm.algorithms.registry import build_algorithm
from fedfm.config.schema import RunConfig
from fedfm.errors import FedfmError
from fedfm.privacy.accountant import PrivacyAccountant, noise_multiplier_for
from fedfm.privacy.client_dp import with_client_dp
from fedfm.robustness.aggregators import build_robust_fold, cohort_requirement


@dataclass
class ServerSide:
    algorithm: Algorithm
    accountant: PrivacyAccountant | None = None
    target_epsilon: float | None = None

    def privacy_record(self) -> dict:
        """Per-round privacy metrics: (epsilon, delta) spent so far and the fold's clipping stats."""
        if self.accountant is None:
            return {}
        out = {"dp_epsilon": self.accountant.epsilon(), "dp_delta": self.accountant.delta}
        for k, v in getattr(self.algorithm.fold, "last_round", {}).items():
            if isinstance(v, (int, float)):
                out[f"dp_{k}"] = v
        return out

    def privacy_summary(self) -> dict | None:
        """What ``summary.json`` reports under ``privacy`` (None without client-level DP)."""
        acc = self.accountant
        if acc is None:
            return None
        return {
            "epsilon": acc.epsilon(),
            "delta": acc.delta,
            "noise_multiplier": acc.noise_multiplier,
            "sampling_rate": acc.sampling_rate,
            "accountant": acc.kind,
            "rounds_accounted": acc.steps,
            "target_epsilon": self.target_epsilon,
        }

    def budget_allows_next_round(self) -> bool:
        """False when one more round would push epsilon past the target budget."""
        if self.accountant is None or self.target_epsilon is None:
            return True
        return self.accountant.epsilon_after(self.accountant.steps + 1) <= self.target_epsilon


def build_server(cfg: RunConfig, num_clients: int) -> ServerSide:
    algorithm = build_algorithm(cfg.algorithm, num_clients=num_clients)
    dp = cfg.privacy.client_dp
    rb = cfg.robust
    if rb.rule != "mean":
        if dp.enabled:
            raise FedfmError(f"robust.rule={rb.rule} and privacy.client_dp cannot be combined yet")
        if not hasattr(algorithm.fold, "optimizer") or cfg.algorithm.name == "scaffold":
            raise FedfmError(f"robust.rule={rb.rule} needs a FedAvg-family algorithm, not {cfg.algorithm.name}")
        n, f = cfg.federation.clients_per_round, rb.num_byzantine
        need = cohort_requirement(rb.rule, n, f)
        if need:
            raise FedfmError(
                f"robust.rule={rb.rule} needs {need} clients per round; got n={n}, f={f} (robust.num_byzantine)"
            )
        algorithm.fold = build_robust_fold(
            rb.rule,
            algorithm.fold.optimizer,
            num_byzantine=rb.num_byzantine,
            trim_fraction=rb.trim_fraction,
            multi_krum_m=rb.multi_krum_m,
            norm_bound=rb.norm_bound,
        )
    if not dp.enabled:
        return ServerSide(algorithm)
    q = cfg.federation.clients_per_round / num_clients
    delta = dp.delta if dp.delta is not None else min(1e-5, 1.0 / num_clients)
    sigma = dp.noise_multiplier
    if sigma is None:
        sigma = noise_multiplier_for(dp.target_epsilon, delta, q, cfg.federation.rounds, kind=dp.accountant)
    try:
        with_client_dp(
            algorithm,
            clip_norm=dp.clip_norm,
            noise_multiplier=sigma,
            expected_clients=float(cfg.federation.clients_per_round),
            adaptive=dp.adaptive,
            target_quantile=dp.target_quantile,
            clip_lr=dp.clip_lr,
            seed=cfg.seed,
        )
    except ValueError as err:
        raise FedfmError(f"privacy.client_dp: {err}") from None
    accountant = PrivacyAccountant(sigma, q, delta, kind=dp.accountant)
    return ServerSide(algorithm, accountant, dp.target_epsilon)
