"""Compose the server side of a run from the config: algorithm + wrapped fold + accountant.

Privacy and robustness are folds that wrap the algorithm's own fold; this is
the one place that decides which, so no algorithm carries a special case for
them. Local DP-SGD is client-side: :func:`build_dp_sgd` makes the one
privatizer the :class:`~fedfm.client.trainer.LocalTrainer` holds.
"""

from __future__ import annotations

import logging
import math

from fedfm.algorithms.base import Algorithm, Broadcast
from fedfm.algorithms.registry import build_algorithm
from fedfm.config.schema import RunConfig
from fedfm.data.encode import steps_for
from fedfm.errors import FedfmError
from fedfm.privacy.accountant import PrivacyAccountant, noise_multiplier_for
from fedfm.privacy.client_dp import with_client_dp
from fedfm.privacy.dp_sgd import (
    LocalDPSGD,
    SampleLevelAccountant,
    calibrate_noise_multiplier,
    calibrate_per_client,
    default_delta,
    sampling_rate_for,
)
from fedfm.registry import ALGORITHMS, MEAN_DELTA, NEEDS_ALL_UPDATES, NEEDS_ROOT_DATA, ROBUST_RULES, SECURE_SUM
from fedfm.robustness.aggregators import ServerUpdate, build_robust_fold, cohort_requirement
from fedfm.client.data import Client
from fedfm.client.trainer import LocalTrainer
from fedfm.server.server import Server

log = logging.getLogger("fedfm")


class Privacy:
    """Client-level DP's bookkeeping on the server: the accountant, stepped once per released version, and the budget."""

    def __init__(self, accountant: PrivacyAccountant, target_epsilon: float | None) -> None:
        self.accountant = accountant
        self.target_epsilon = target_epsilon

    def step(self) -> None:
        self.accountant.step()

    def record(self) -> dict:
        """Per-round privacy metrics: (epsilon, delta) spent so far (the DP fold reports its clipping)."""
        return {"dp_epsilon": self.accountant.epsilon(), "dp_delta": self.accountant.delta}

    def summary(self) -> dict:
        """What ``summary.json`` reports under ``privacy``."""
        acc = self.accountant
        return {
            "epsilon": acc.epsilon(),
            "delta": acc.delta,
            "noise_multiplier": acc.noise_multiplier,
            "sampling_rate": acc.sampling_rate,
            "accountant": acc.kind,
            "rounds_accounted": acc.steps,
            "target_epsilon": self.target_epsilon,
        }

    def allows_next_round(self) -> bool:
        """False when one more round would push epsilon past the target budget."""
        if self.target_epsilon is None:
            return True
        return self.accountant.epsilon_after(self.accountant.steps + 1) <= self.target_epsilon


def root_update(trainer: LocalTrainer, algorithm: Algorithm, root_client: Client) -> ServerUpdate:
    """FLTrust's server update: the clients' own local training, run on the server's root data.

    ``root_client`` is a pseudo-client whose shard is the root dataset; its
    update is computed from the round's global state (the fold's) and never
    travels, so it is not in the byte ledger. Round ``version + 1`` seeds it.
    """

    def update(global_state, version: int):
        return trainer.local_update(algorithm, Broadcast(global_state, version), root_client, version + 1).delta

    return update


def build_server(cfg: RunConfig, num_clients: int, initial_state, *, wire=None, rank_of=None,
                 trainer: LocalTrainer | None = None, root_client: Client | None = None,
                 clients: list[Client] | None = None) -> Server:
    """The run's :class:`Server`: the algorithm, its fold wrapped by a robust rule or client-level DP.

    FLTrust also needs ``trainer`` and the server's ``root_client``; ``wire`` (the codecs) and
    ``rank_of`` (HetLoRA ranks) are the run's. ``clients`` (simulation): an update may claim
    no more examples than its client's training rows (a deployment sets the cap from the rows
    each node registered instead).
    """
    algorithm, privacy = build_algorithm_fold(cfg, num_clients, trainer, root_client)
    sa, asy = cfg.privacy.secure_aggregation, cfg.asynchronous
    server = Server(algorithm, initial_state, wire=wire, privacy=privacy, ema_decay=cfg.algorithm.ema_decay,
                    secure=sa if sa.enabled else None, asynchronous=asy if asy.enabled else None,
                    rank_of=rank_of, seed=cfg.seed, validation=cfg.validation)
    if clients is not None:
        server.example_cap = training_rows(clients)
    return server


def training_rows(clients: list[Client]):
    """``cid -> len(train_idx)`` read at call time (continual stages change the rows), None for an unknown id."""

    def rows(cid: int) -> int | None:
        return len(clients[cid].train_idx) if 0 <= cid < len(clients) else None

    return rows


def build_algorithm_fold(cfg: RunConfig, num_clients: int, trainer=None, root_client=None):
    """A fresh algorithm with its fold wrapped as configured, and the client-level DP bookkeeping (or None)."""
    algorithm = build_algorithm(cfg.algorithm, num_clients=num_clients)
    wrap_robust(cfg, algorithm, trainer, root_client)
    check_secure_aggregation(cfg)
    return algorithm, wrap_client_dp(cfg, algorithm, num_clients)


def wrap_robust(cfg: RunConfig, algorithm: Algorithm, trainer=None, root_client=None) -> None:
    """Wrap the algorithm's fold in the configured robust rule (``robust.rule``; ``mean``: as it is)."""
    dp = cfg.privacy.client_dp
    rb = cfg.robust
    rule = ROBUST_RULES.get(rb.rule)  # a robust rule wraps the algorithm's fold ("mean": no wrapper)
    if rule.supports(NEEDS_ALL_UPDATES):
        if dp.enabled:
            raise FedfmError(f"robust.rule={rb.rule} and privacy.client_dp cannot be combined yet")
        if not algorithm.supports(MEAN_DELTA):
            raise FedfmError(
                f"robust.rule={rb.rule} needs an algorithm whose server step takes one mean delta "
                f"({', '.join(ALGORITHMS.names(MEAN_DELTA))}), not {cfg.algorithm.name}"
            )
        n, f = cfg.federation.clients_per_round, rb.num_byzantine
        need = cohort_requirement(rb.rule, n, f)
        if need:
            raise FedfmError(
                f"robust.rule={rb.rule} needs {need} clients per round; got n={n}, f={f} (robust.num_byzantine)"
            )
    server_update = None
    if rule.supports(NEEDS_ROOT_DATA):
        if trainer is None or root_client is None:
            raise FedfmError(f"robust.rule={rb.rule} needs the server's root dataset (robust.root_examples)")
        server_update = root_update(trainer, algorithm, root_client)
    options = rule.options(rb)
    algorithm.fold = build_robust_fold(
        rb.rule,
        algorithm.fold,
        num_byzantine=rb.num_byzantine,
        server_update=server_update,
        **(options.model_dump() if options is not None else {}),
    )


def wrap_client_dp(cfg: RunConfig, algorithm: Algorithm, num_clients: int) -> Privacy | None:
    """Wrap the algorithm's fold in DP-FedAvg's clip-and-noise (``privacy.client_dp``); its accountant."""
    dp = cfg.privacy.client_dp
    if not dp.enabled:
        return None
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
            reproducible=cfg.privacy.reproducible_noise,
        )
    except ValueError as err:
        raise FedfmError(f"privacy.client_dp: {err}") from None
    warn_if_reproducible_noise(cfg, "privacy.client_dp")
    return Privacy(PrivacyAccountant(sigma, q, delta, kind=dp.accountant), dp.target_epsilon)


def check_secure_aggregation(cfg: RunConfig) -> None:
    """Refuse combinations that secure aggregation cannot serve, in one line each."""
    sa = cfg.privacy.secure_aggregation
    if not sa.enabled:
        return
    n = cfg.federation.clients_per_round
    if ROBUST_RULES.supports(cfg.robust.rule, NEEDS_ALL_UPDATES):
        raise FedfmError(
            f"robust.rule={cfg.robust.rule} needs every update, but secure aggregation shows the server only the sum"
        )
    if not ALGORITHMS.supports(cfg.algorithm.name, SECURE_SUM):
        raise FedfmError(
            f"secure aggregation supports the algorithms whose fold sums securely "
            f"({', '.join(ALGORITHMS.names(SECURE_SUM))}), not {cfg.algorithm.name}"
        )
    if n < 3:
        raise FedfmError(f"secure aggregation needs at least 3 clients per round (a sum of {n} reveals too much)")
    k = n - 1 if sa.neighbours is None else min(sa.neighbours, n - 1)
    if sa.threshold is not None and not (2 * sa.threshold > k + 1 and sa.threshold <= k + 1):
        raise FedfmError(
            f"privacy.secure_aggregation.threshold={sa.threshold} must satisfy (k+1)/2 < t <= k+1 "
            f"for neighbourhoods of k+1={k + 1} clients"
        )
    bits = sa.bits if sa.bits is not None else 1
    if n * (2**bits - 1) > 2**32 - 1:
        raise FedfmError(f"privacy.secure_aggregation.bits={sa.bits}: a sum of {n} clients overflows 32 bits")


def distributed_noise_share(cfg: RunConfig, sizes: dict[int, int]) -> float:
    """``1 / sqrt(t)`` for ``privacy.dp_sgd.noise: distributed``, after checking the conditions it needs.

    Each client's noise std is then ``σC / √t`` and every sum the server can
    unmask holds at least ``t`` of them (module doc of :mod:`fedfm.privacy.dp_sgd`).
    The aggregate equals central DP-SGD only with one SGD step per round from the
    global model, one sampling rate for all, and FedAvg's example weights
    uncapped; each condition missing is a one-line error.
    """
    d, sa, tc = cfg.privacy.dp_sgd, cfg.privacy.secure_aggregation, cfg.train
    why = "privacy.dp_sgd.noise=distributed"
    if not sa.enabled:
        raise FedfmError(f"{why} needs privacy.secure_aggregation.enabled=true (the server may see only the sum)")
    if sa.threshold is None:
        raise FedfmError(f"{why} needs privacy.secure_aggregation.threshold: the fewest noise shares a sum can hold")
    if d.sampling_rate is None:
        raise FedfmError(f"{why} needs privacy.dp_sgd.sampling_rate (one Poisson rate q for every client)")
    if tc.local_steps != 1 or tc.local_epochs is not None:
        raise FedfmError(f"{why} needs train.local_steps=1 (the update must be one noised gradient step)")
    if tc.optimizer != "sgd":
        raise FedfmError(f"{why} needs train.optimizer=sgd (an update linear in the noised gradient)")
    if cfg.algorithm.weighting != "examples":
        raise FedfmError(f"{why} needs algorithm.weighting=examples")
    if cfg.privacy.client_dp.enabled:
        raise FedfmError(f"{why} cannot be combined with privacy.client_dp")
    if max(sizes.values()) > sa.max_weight:
        raise FedfmError(
            f"{why}: a client has {max(sizes.values())} examples, more than "
            f"privacy.secure_aggregation.max_weight={sa.max_weight:g} (its weight would be capped)"
        )
    return 1.0 / math.sqrt(sa.threshold)


def build_dp_sgd(cfg: RunConfig, fm, enc, clients) -> LocalDPSGD | None:
    """Local sample-level DP-SGD on every client (``privacy.dp_sgd``), or None when it is off.

    Without ``noise_multiplier``, σ is calibrated so that every client ends
    within ``target_epsilon`` after its *planned* participations
    ``P = ceil(rounds · clients_per_round / num_clients)`` (the expected number,
    rounded up) of ``K_i`` local steps each at ``q_i = min(1, B / n_i)`` (or the
    one ``sampling_rate``). With
    ``noise: per_client`` (the default) each client gets its own σ_i and lands at
    the target; with ``noise: shared`` one σ serves all: the client with the
    most expected steps at the largest ``q`` lands at the target, the others below it. A client sampled more often than planned sits
    out once its next participation would pass the target (with both
    ``noise_multiplier`` and ``target_epsilon`` given, that check alone holds
    the budget); the run stops when no client can train again. With ``noise:
    distributed`` one σ is calibrated as for ``shared`` and each client adds its
    share of it (:func:`distributed_noise_share`).
    """
    d = cfg.privacy.dp_sgd
    if not d.enabled:
        return None
    tc = cfg.train
    if tc.max_grad_norm is not None:
        raise FedfmError(
            "train.max_grad_norm (batch clipping) cannot be combined with privacy.dp_sgd, "
            "which clips every example to privacy.dp_sgd.max_grad_norm"
        )
    if ROBUST_RULES.supports(cfg.robust.rule, NEEDS_ROOT_DATA):
        raise FedfmError(f"robust.rule={cfg.robust.rule} cannot be combined with privacy.dp_sgd yet "
                         "(its root update would run DP-SGD)")
    sizes = {c.cid: len(c.train_idx) for c in clients}
    if min(sizes.values(), default=0) < 1:
        raise FedfmError("privacy.dp_sgd: every client needs at least one training example")
    share = distributed_noise_share(cfg, sizes) if d.noise == "distributed" else 1.0
    steps = {cid: steps_for(n, tc.batch_size, tc.local_steps, tc.local_epochs) for cid, n in sizes.items()}
    sigma, planned = d.noise_multiplier, None
    if sigma is None:
        f = cfg.federation
        planned = math.ceil(f.rounds * f.clients_per_round / len(sizes) - 1e-9)
        plans = {
            cid: (d.sampling_rate or sampling_rate_for(tc.batch_size, n), d.delta if d.delta is not None else default_delta(n), planned * steps[cid])
            for cid, n in sizes.items()
        }
        try:
            if d.noise == "per_client":
                sigma = calibrate_per_client(d.target_epsilon, plans, d.accountant)
            else:
                sigma = calibrate_noise_multiplier(d.target_epsilon, list(plans.values()), d.accountant)
        except ValueError as err:
            raise FedfmError(f"privacy.dp_sgd: {err}") from None
    accountant = SampleLevelAccountant(sigma, sizes, tc.batch_size, d.delta, d.accountant, d.sampling_rate)
    dp = LocalDPSGD(fm, enc, accountant, d.max_grad_norm, d.target_epsilon, steps_per_round=steps, noise_share=share,
                    reproducible=cfg.privacy.reproducible_noise)
    dp.planned_participations = planned
    if dp.exhausted():
        raise FedfmError(
            f"privacy.dp_sgd: target_epsilon={d.target_epsilon} is below the epsilon of one participation "
            f"of every client (noise_multiplier={accountant.noise_multiplier:g})"
        )
    warn_if_reproducible_noise(cfg, "privacy.dp_sgd")
    return dp


def warn_if_reproducible_noise(cfg: RunConfig, mechanism: str) -> None:
    """Log, as the mechanism is built at run start, that ``privacy.reproducible_noise`` makes its noise public."""
    if cfg.privacy.reproducible_noise:
        log.warning(
            "%s: privacy.reproducible_noise=true derives the DP noise from seed=%d; the run is reproducible "
            "but NOT private against anyone who has its config (leave it false for a real deployment)",
            mechanism, cfg.seed,
        )
