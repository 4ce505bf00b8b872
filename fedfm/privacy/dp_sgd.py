"""Local sample-level DP-SGD on a client, with a per-client accountant.

DP-SGD (Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar & Zhang 2016, "Deep
Learning with Differential Privacy", CCS). Every local step of client ``i``:

1. **Poisson batch**: each of its ``n_i`` training examples is included
   independently with probability ``q_i = min(1, B / n_i)`` (``B`` =
   ``train.batch_size``), so batches have variable size and may be empty;
2. **per-example gradients** of the trainable parameters only (the frozen base
   never gets one), each example's loss being its own mean loss (for causal LM:
   the mean over that example's target tokens);
3. **joint clipping**: every example's gradient (all trainable tensors
   together) is scaled by ``min(1, C / ‖g‖₂)``;
4. **noise**: ``N(0, σ²C²)`` per coordinate is added to the *sum* of the clipped
   gradients, which is divided by the **expected** batch size ``q_i · n_i``
   (not the realised one, whose size would otherwise be released unnoised).

The result replaces ``.grad``; the optimizer (SGD or AdamW), the algorithm's
gradient hook (FedProx, SCAFFOLD) and the update sent to the server are
post-processing of these noised gradients, so they keep the guarantee.

Per-example gradients come from Opacus (Yousefpour et al. 2021) hooks
(``GradSampleHooks``) attached once to the one shared model and switched on
only inside a DP step, so evaluation and every other forward pass are
untouched. Where the hooks cannot give a true per-example gradient -- a
parameter used once and broadcast over the batch (peft's soft prompts, BERT's
position embeddings under full fine-tuning), IA3 scaling vectors, layers
Opacus cannot trace -- the first step detects it (missing or wrongly shaped
``grad_sample``, or per-example gradients that do not sum to the batch
gradient) and the engine falls back, for good, to one forward/backward pass
per example (exact for any model, slower). Whole-model ``torch.func.vmap``
is not an option: transformers' mask code branches on tensor values.

Accounting (:class:`SampleLevelAccountant`): the guarantee of client ``i``
protects one of *its* examples (add/remove-one neighbouring relation on its
local data set). Each of its steps is a Poisson-sampled Gaussian mechanism
``(q_i, σ)``; all its steps over every round it took part in compose, and
``ε_i = ε(σ, q_i, δ_i, T_i)`` from the RDP (or PLD) accountant of
:mod:`fedfm.privacy.accountant`. Default ``δ_i = min(1e-5, 1 / n_i)``: below
one over the size of the protected data set, as usual (for any silo under
100,000 examples that is 1e-5).

Distributed noise (``noise: distributed``): with secure aggregation the
server sees only the cohort's sum, so the Gaussian noise need only be there in
the sum (the hybrid of secure aggregation and DP of Truex et al. 2019, "A
Hybrid Approach to Privacy-Preserving Federated Learning"; the distributed DP of
Kairouz, Liu & Steinke 2021). Each client adds ``N(0, σ²C²/t)``, ``t`` being the
secure-aggregation threshold: every sum the server can unmask has at least ``t``
shares, so its noise std is at least ``σC``. With one local SGD step per round,
one sampling rate ``q`` for every client and example-weighted FedAvg, the
aggregate is then exactly central DP-SGD on the union of the cohort's data
(Poisson rate ``q``, expected batch ``q·Σn_i``), and the accountant above holds
against the server and everyone who sees the global models: noise ``√t`` times
smaller than local noise for the same ε. It does not hold against a server that
colludes with more than ``m - t`` of a round's ``m`` clients (their shares can be
subtracted), nor for the fixed-point rounding of the masked sums (step below
1e-6 of the range here; Kairouz et al.'s discrete Gaussian removes that caveat).
:func:`fedfm.server.compose.build_dp_sgd` enforces the conditions.

Randomness (:mod:`fedfm.privacy.noise`): by default every client
participation draws its Poisson batches and its noise from two fresh
``torch.Generator`` objects seeded from OS entropy (:mod:`secrets`), never
from the run seed nor from torch's global generator (whose state checkpoints
store). The batches need that secrecy as much as the noise: the accountant's ε
relies on privacy amplification by subsampling, which holds only if nobody
knows which examples a step used; with the batches known, each step is only
as private as an unsampled Gaussian mechanism (q = 1). ``reproducible=True``
(config ``privacy.reproducible_noise: true``) seeds both from the session seed
(run seed, round, client): bit-identical reruns for research, **not private**
against anyone who has the config. Other local randomness (dropout masks)
stays seeded: the guarantee does not depend on it. Either way torch's PRNG is
not cryptographically secure (see :mod:`fedfm.privacy.noise`).

Not covered by the guarantee: the example count ``n_i`` and the
``train_loss`` metric the client reports travel unnoised (simulation
diagnostics).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from fedfm.data.encode import Encoded, make_batch
from fedfm.privacy.accountant import KINDS, compute_epsilon, noise_multiplier_for
from fedfm.privacy.noise import noise_generator

log = logging.getLogger("fedfm")

ENGINES = ("auto", "hooks", "loop")


def sampling_rate_for(batch_size: int, num_examples: int) -> float:
    """Poisson inclusion probability ``q = min(1, B / n)``: the expected batch is ``B`` (all of a small client)."""
    if num_examples < 1:
        raise ValueError(f"a client with {num_examples} training examples cannot train")
    return min(1.0, batch_size / num_examples)


def default_delta(num_examples: int) -> float:
    """``min(1e-5, 1 / n)``: δ below one over the size of the protected (local) data set."""
    return min(1e-5, 1.0 / max(1, num_examples))


def poisson_sample(rows: torch.Tensor, q: float, generator: torch.Generator) -> torch.Tensor:
    """The rows each included independently with probability ``q`` (may be empty)."""
    if q >= 1.0:
        return rows
    return rows[torch.rand(len(rows), generator=generator) < q]


def per_example_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    """Each example's own loss, shape ``[B]``.

    ``seq_cls``: cross-entropy of its label. ``causal_lm``: the mean next-token
    cross-entropy over that example's target tokens (labels ``-100`` are
    ignored; soft prompts prepend virtual positions to the logits, which are
    dropped). For one example this equals the model's own ``.loss``.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    labels = batch["labels"]
    if task == "causal_lm":
        logits = logits[:, logits.shape[1] - labels.shape[1] :][:, :-1]
        target = labels[:, 1:]
        tok = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none")
        return tok.sum(1) / (target != -100).sum(1).clamp_min(1)
    return F.cross_entropy(logits.float(), labels, reduction="none")


@contextlib.contextmanager
def _quiet_absl():
    """dp_accounting logs a warning for every RDP order it drops at large q; they are expected."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=4096)
def epsilon_for(noise_multiplier: float, q: float, delta: float, steps: int, kind: str = "rdp") -> float:
    """ε after ``steps`` Poisson-sampled Gaussian steps (cached; 0 for 0 steps, ``inf`` for σ = 0)."""
    with _quiet_absl():
        return compute_epsilon(noise_multiplier, q, delta, steps, kind)


def calibrate_noise_multiplier(
    target_epsilon: float, plans: Iterable[tuple[float, float, int]], kind: str = "rdp"
) -> float:
    """The smallest σ (to :func:`noise_multiplier_for`'s tolerance) with ε ≤ target for every plan.

    ``plans`` are ``(q, δ, steps)`` triples, one per client. ε grows with q
    and steps and falls with σ, so σ only ever rises while walking the plans;
    walking them worst-first (largest ``q·√steps``) makes that one bisection
    plus one ε evaluation per other distinct plan.
    """
    todo = sorted({p for p in plans if p[2] > 0}, key=lambda p: (p[0] * math.sqrt(p[2]), p[2]), reverse=True)
    if not todo:
        raise ValueError("no client has a step to calibrate the noise for")
    sigma = 0.0
    for q, delta, steps in todo:
        if sigma > 0 and epsilon_for(sigma, q, delta, steps, kind) <= target_epsilon:
            continue
        with _quiet_absl():
            sigma = noise_multiplier_for(target_epsilon, delta, q, steps, kind)
    return sigma


def calibrate_per_client(
    target_epsilon: float, plans: Mapping[int, tuple[float, float, int]], kind: str = "rdp"
) -> dict[int, float]:
    """Each client's own smallest σ_i with ε(σ_i, q_i, δ_i, T_i) ≤ target (clients with equal plans share one).

    A silo with more examples samples a smaller fraction per step (privacy
    amplification by subsampling) and so needs less noise; the largest σ_i is
    the single σ of :func:`calibrate_noise_multiplier`.
    """
    cache: dict[tuple[float, float, int], float] = {}
    out = {}
    for cid, plan in plans.items():
        if plan not in cache:
            cache[plan] = calibrate_noise_multiplier(target_epsilon, [plan], kind) if plan[2] > 0 else 0.0
        out[cid] = cache[plan]
    return out


class SampleLevelAccountant:
    """Per-client sample-level (ε, δ) of local DP-SGD.

    Client ``i`` has sampling rate ``q_i = min(1, B / n_i)``, its own ``δ_i``
    (given, or :func:`default_delta`) and a step count ``T_i`` over all rounds;
    ``epsilon(i) = ε(σ_i, q_i, δ_i, T_i)``; ``noise_multiplier`` is one σ for
    every client or a map ``{client: σ_i}``. Holds only counts and parameters
    (``state_dict`` is JSON-able).
    """

    def __init__(
        self,
        noise_multiplier: float | Mapping[int, float],
        sizes: Mapping[int, int],
        batch_size: int,
        delta: float | None = None,
        kind: str = "rdp",
        sampling_rate: float | None = None,
    ) -> None:
        if isinstance(noise_multiplier, Mapping):
            sigma = {int(c): float(s) for c, s in noise_multiplier.items()}
        else:
            sigma = {int(c): float(noise_multiplier) for c in sizes}
        for s in sigma.values():
            if not (s >= 0 and math.isfinite(s)):
                raise ValueError(f"noise_multiplier must be a finite number >= 0, got {s}")
        if set(sigma) != {int(c) for c in sizes}:
            raise ValueError("noise_multiplier: one sigma per client is needed")
        if kind not in KINDS:
            raise ValueError(f"accountant kind must be one of {KINDS}, got {kind!r}")
        if delta is not None and not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if sampling_rate is not None and not 0 < sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
        self.sigma = sigma  # σ_i per client
        self.noise_multiplier = max(sigma.values(), default=0.0)  # the largest σ_i
        self.kind = kind
        self.batch_size = int(batch_size)
        self.sizes = {int(c): int(n) for c, n in sizes.items()}
        self.sampling_rate = None if sampling_rate is None else float(sampling_rate)  # one q for all, or None
        self.q = {c: self.sampling_rate or sampling_rate_for(batch_size, n) for c, n in self.sizes.items()}
        self.delta_given = None if delta is None else float(delta)
        self.delta = {c: float(delta) if delta is not None else default_delta(n) for c, n in self.sizes.items()}
        self.steps = {c: 0 for c in self.sizes}
        self.participations = {c: 0 for c in self.sizes}

    def epsilon(self, cid: int, steps: int | None = None) -> float:
        """ε of client ``cid`` after its steps so far (or after ``steps`` steps)."""
        t = self.steps[cid] if steps is None else int(steps)
        return epsilon_for(self.sigma[cid], self.q[cid], self.delta[cid], t, self.kind)

    def step(self, cid: int, n: int = 1) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.steps[cid] += int(n)

    def trained(self) -> list[int]:
        return [c for c, t in self.steps.items() if t > 0]

    def epsilon_max(self) -> float:
        """The largest ε over all clients so far (0 before any step)."""
        return max((self.epsilon(c) for c in self.trained()), default=0.0)

    def epsilon_mean(self) -> float | None:
        """The mean ε over the clients that trained (None if none did)."""
        eps = [self.epsilon(c) for c in self.trained()]
        return float(np.mean(eps)) if eps else None

    def state_dict(self) -> dict:
        return {
            "noise_multiplier": {str(c): s for c, s in self.sigma.items()},
            "kind": self.kind,
            "batch_size": self.batch_size,
            "sizes": {str(c): n for c, n in self.sizes.items()},
            "delta": self.delta_given,
            "sampling_rate": self.sampling_rate,
            "steps": {str(c): t for c, t in self.steps.items()},
            "participations": {str(c): t for c, t in self.participations.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        sizes = {int(c): int(n) for c, n in state["sizes"].items()}
        self.__init__(state["noise_multiplier"], sizes, state["batch_size"], state["delta"], state["kind"],
                      state.get("sampling_rate"))
        self.steps = {int(c): int(t) for c, t in state["steps"].items()}
        self.participations = {int(c): int(t) for c, t in state["participations"].items()}


class _Unsupported(Exception):
    """Opacus hooks did not give true per-example gradients for this model."""


class PerExampleGradients:
    """Per-example gradients of ``params`` through ``model``, clipped jointly and summed.

    ``engine``: ``"hooks"`` (Opacus, vectorised; raises if the model needs the
    fallback), ``"loop"`` (one forward/backward per example; any model) or
    ``"auto"`` (hooks, falling back to the loop the first time the hooks fail
    a check). The hooks are attached once and enabled only inside
    :meth:`clipped_sum`.
    """

    def __init__(self, model: torch.nn.Module, params: Mapping[str, torch.nn.Parameter], task: str, engine: str = "auto") -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.model = model
        self.params = params
        self.task = task
        self.requested = engine
        self.engine = "loop"
        self._validated = False
        self._hooks = None
        if engine != "loop":
            try:
                from opacus.grad_sample import GradSampleHooks
            except ImportError:
                if engine == "hooks":
                    raise
                log.info("DP-SGD: opacus is not installed; computing per-example gradients one example at a time")
            else:
                hooks = getattr(model, "_fedfm_grad_sample_hooks", None)
                if hooks is None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=False)
                    model._fedfm_grad_sample_hooks = hooks
                hooks.disable_hooks()
                self._hooks = hooks
                self.engine = "hooks"

    # -- the two engines --------------------------------------------------------
    def clipped_sum(self, enc: Encoded, idx: torch.Tensor, max_grad_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(Σ_b clip_C(g_b) per parameter, losses [B])`` for the examples ``idx`` (non-empty)."""
        if self.engine == "hooks":
            try:
                return self._hooks_sum(enc, idx, max_grad_norm)
            except (_Unsupported, RuntimeError, ValueError, NotImplementedError, TypeError) as err:
                if self.requested == "hooks":
                    raise
                log.info("DP-SGD: per-example gradients one example at a time (Opacus hooks: %s)", err)
                self._drop_hooks()
        return self._loop_sum(enc, idx, max_grad_norm)

    def _device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def _batch(self, enc: Encoded, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        dev = self._device()
        return {k: v.to(dev) for k, v in make_batch(enc, idx, self.task).items()}

    def _hooks_sum(self, enc, idx, C):
        params = list(self.params.items())
        for _, p in params:
            p.grad, p.grad_sample = None, None
        self._hooks.enable_hooks()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses = per_example_loss(self.model, self._batch(enc, idx), self.task)
                losses.sum().backward()
        finally:
            self._hooks.disable_hooks()
        B = len(idx)
        per_example = []
        for name, p in params:
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                if p.grad is not None and bool(p.grad.any()):
                    raise _Unsupported(f"no per-example gradient for {name}")
                gs = torch.zeros((B, *p.shape), dtype=torch.float32, device=p.device)
            elif not isinstance(gs, torch.Tensor) or tuple(gs.shape) != (B, *p.shape):
                shape = tuple(gs.shape) if isinstance(gs, torch.Tensor) else type(gs).__name__
                raise _Unsupported(f"per-example gradient of {name} has shape {shape}, not {(B, *p.shape)}")
            elif not self._validated and B >= 2 and p.grad is not None:
                err = float((gs.sum(0) - p.grad).abs().max())
                if err > 1e-3 * float(p.grad.abs().max()) + 1e-6:
                    raise _Unsupported(f"per-example gradients of {name} do not sum to its batch gradient")
            per_example.append(gs)
        if B >= 2:
            self._validated = True
        for _, p in params:
            p.grad, p.grad_sample = None, None
        sq = sum(g.reshape(B, -1).float().pow(2).sum(1) for g in per_example)
        factor = (C / sq.sqrt().clamp_min(1e-12)).clamp(max=1.0)
        sums = [torch.einsum("b,b...->...", factor, g.float()) for g in per_example]
        return sums, losses.detach()

    def _loop_sum(self, enc, idx, C):
        params = list(self.params.values())
        sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        losses = []
        for row in idx.reshape(-1, 1):
            for p in params:
                p.grad = None
            with warnings.catch_warnings():  # in case another engine's (disabled) hooks are attached
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss = per_example_loss(self.model, self._batch(enc, row), self.task)[0]
                loss.backward()
            grads = [p.grad.float() if p.grad is not None else None for p in params]
            norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
            factor = min(1.0, C / norm) if norm > 0 else 1.0
            for s, g in zip(sums, grads):
                if g is not None:
                    s.add_(g, alpha=factor)
            losses.append(loss.detach())
        for p in params:
            p.grad = None
        return sums, torch.stack(losses)

    def _drop_hooks(self) -> None:
        hooks, self._hooks, self.engine = self._hooks, None, "loop"
        if hooks is None:
            return
        hooks.cleanup()  # removes the hooks and Opacus's attributes on the parameters
        for m in self.model.modules():  # what a failed hooked pass may have left behind
            for attr in ("activations", "max_batch_len"):
                m.__dict__.pop(attr, None)  # (peft wrappers forward hasattr to the wrapped module)
        if getattr(self.model, "_fedfm_grad_sample_hooks", None) is hooks:
            del self.model._fedfm_grad_sample_hooks


class LocalDPSGD:
    """Local DP-SGD for every client on the one shared model (one per process).

    :meth:`session` opens a client's participation (or declines it when its
    next participation would take it past ``target_epsilon``); each
    :meth:`DPSGDSession.step` draws a Poisson batch, sets the noised, clipped
    mean gradient on the trainable parameters and counts the step in
    :attr:`accountant`. Batches and noise come from OS entropy unless
    ``reproducible`` (module doc, "Randomness").
    """

    def __init__(
        self,
        fm,
        enc: Encoded,
        accountant: SampleLevelAccountant,
        max_grad_norm: float = 1.0,
        target_epsilon: float | None = None,
        steps_per_round: Mapping[int, int] | None = None,
        engine: str = "auto",
        noise_share: float = 1.0,
        reproducible: bool = False,
    ) -> None:
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
        if target_epsilon is not None and not target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
        if not 0 < noise_share <= 1:
            raise ValueError(f"noise_share must be in (0, 1], got {noise_share}")
        self.fm = fm
        self.enc = enc
        self.accountant = accountant
        self.max_grad_norm = float(max_grad_norm)
        # a client's noise std is noise_share * sigma_i * C: 1 for local noise, 1 / sqrt(t) for distributed noise
        self.noise_share = float(noise_share)
        # batches and noise from the session seed (research only) instead of OS entropy (module doc)
        self.reproducible = bool(reproducible)
        self.target_epsilon = target_epsilon
        self.steps_per_round = dict(steps_per_round or {})  # for exhausted(): each client's local steps
        self.grads = PerExampleGradients(fm.model, fm.params, fm.task, engine)
        self.planned_participations: int | None = None  # set when σ was calibrated
        self.skipped_total = 0
        self._skipped_round = 0

    @property
    def noise_multiplier(self) -> float:
        return self.accountant.noise_multiplier

    def admits(self, cid: int, steps: int) -> bool:
        """Whether ``steps`` more steps keep client ``cid`` within ``target_epsilon``."""
        if self.target_epsilon is None:
            return True
        acc = self.accountant
        return acc.epsilon(cid, acc.steps[cid] + steps) <= self.target_epsilon

    def state_dict(self, tensors: dict | None = None, orders: dict | None = None) -> dict:
        """The per-client accountants and the sat-out count (a checkpoint section)."""
        return {"accountant": self.accountant.state_dict(), "skipped_total": int(self.skipped_total)}

    def load_state_dict(self, meta: dict, tensors=None, orders=None) -> None:
        self.accountant.load_state_dict(meta["accountant"])
        self.skipped_total = int(meta["skipped_total"])

    def exhausted(self) -> bool:
        """True when no client can take part again without passing ``target_epsilon``."""
        if self.target_epsilon is None or not self.steps_per_round:
            return False
        return not any(self.admits(c, k) for c, k in self.steps_per_round.items())

    def session(self, cid: int, train_idx, steps: int, seed: int, round_idx: int | None = None) -> "DPSGDSession | None":
        """Open client ``cid``'s participation of ``steps`` steps, or None (logged) if its budget forbids it."""
        if not self.admits(cid, steps):
            acc = self.accountant
            where = f"round {round_idx}: " if round_idx is not None else ""
            log.warning(
                "%sclient %d skipped: %d more DP-SGD steps would take its epsilon from %.3f to %.3f > target %g",
                where, cid, steps, acc.epsilon(cid), acc.epsilon(cid, acc.steps[cid] + steps), self.target_epsilon,
            )
            self.skipped_total += 1
            self._skipped_round += 1
            return None
        self.accountant.participations[cid] += 1
        return DPSGDSession(self, cid, train_idx, seed)

    # -- reporting --------------------------------------------------------------
    def round_record(self) -> dict:
        """Per-round metrics: the largest client ε so far and the clients skipped this round."""
        out = {"dp_sgd_epsilon": self.accountant.epsilon_max(), "dp_sgd_skipped": self._skipped_round}
        self._skipped_round = 0
        return out

    def summary(self) -> dict:
        """What ``summary.json`` reports under ``privacy.dp_sgd``."""
        acc = self.accountant
        qs = list(acc.q.values())
        return {
            "epsilon_max": acc.epsilon_max(),
            "epsilon_mean": acc.epsilon_mean(),
            "delta": max(acc.delta.values()),  # the weakest client's (all equal unless derived per client)
            "delta_rule": "given" if acc.delta_given is not None else "min(1e-5, 1/n_i)",
            "noise_multiplier": acc.noise_multiplier,  # the largest σ_i
            "noise_multiplier_min": min(acc.sigma.values(), default=0.0),
            "max_grad_norm": self.max_grad_norm,
            "target_epsilon": self.target_epsilon,
            "planned_participations": self.planned_participations,
            "accountant": acc.kind,
            "expected_batch_size": acc.batch_size if acc.sampling_rate is None else None,
            "sampling_rate": acc.sampling_rate,  # one q for all clients (else q_i = min(1, B / n_i))
            "noise_share": self.noise_share,  # 1: local noise; 1/sqrt(t): distributed noise (secure aggregation)
            "sampling_rate_min": min(qs),
            "sampling_rate_max": max(qs),
            "clients_trained": len(acc.trained()),
            "skipped_participations": self.skipped_total,
            "engine": self.grads.engine,
            "per_client": {
                str(c): {
                    "epsilon": acc.epsilon(c),
                    "noise_multiplier": acc.sigma[c],
                    "delta": acc.delta[c],
                    "sampling_rate": acc.q[c],
                    "steps": acc.steps[c],
                    "participations": acc.participations[c],
                }
                for c in sorted(acc.sizes)
            },
        }


class DPSGDSession:
    """One client's participation: its Poisson sampler, its noise stream, its steps.

    ``seed`` seeds both only when the owner is ``reproducible``; otherwise each
    gets fresh OS entropy, kept in memory for this participation only.
    """

    def __init__(self, owner: LocalDPSGD, cid: int, train_idx, seed: int) -> None:
        self.owner = owner
        self.cid = cid
        self.rows = torch.as_tensor(np.asarray(train_idx), dtype=torch.int64)
        if len(self.rows) != owner.accountant.sizes[cid]:
            raise ValueError(
                f"client {cid} has {len(self.rows)} training examples, but its accountant was set up for "
                f"{owner.accountant.sizes[cid]}"
            )
        self.q = owner.accountant.q[cid]
        self.expected_batch_size = self.q * len(self.rows)  # min(B, n_i), or q·n_i with one sampling rate
        batch_seed = noise_seed = None  # OS entropy
        if owner.reproducible:
            batch_seed = int(seed)
            noise_seed = int(np.random.SeedSequence([int(seed), 0xD95]).generate_state(1, np.uint64)[0] >> 1)
        self.batch_gen = noise_generator(batch_seed)
        self.noise_gen = noise_generator(noise_seed)

    def step(self) -> torch.Tensor:
        """Set ``(Σ clip(g_b) + N(0, s²σ²C²)) / (q·n)`` as ``.grad`` (``s`` = noise share); return ``Σ loss_b / (q·n)``.

        The returned loss (the objective DP-SGD differentiates, before clipping)
        is an unbiased estimate of the mean training loss; 0 for an empty batch.
        """
        o = self.owner
        idx = poisson_sample(self.rows, self.q, self.batch_gen)
        params = list(o.fm.params.values())
        C = o.max_grad_norm
        if len(idx) > 0:
            sums, losses = o.grads.clipped_sum(o.enc, idx, C)
            loss_sum = losses.sum()
        else:
            sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
            loss_sum = torch.zeros((), device=params[0].device)
        std = o.noise_share * o.accountant.sigma[self.cid] * C
        for p, s in zip(params, sums):
            if std > 0:
                noise = torch.normal(0.0, std, size=tuple(p.shape), generator=self.noise_gen)
                s = s + noise.to(s.device)
            p.grad = (s / self.expected_batch_size).to(dtype=p.dtype)
        o.accountant.step(self.cid)
        return loss_sum / self.expected_batch_size
