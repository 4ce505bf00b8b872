"""The always-on server loop of federated continual learning: a driver over stages.

The server never restarts: the run's one :class:`~fedfm.server.server.Server`
serves ``rounds_per_stage`` rounds per stage, stage after stage, so every round
publishes a new numbered global version and the numbers keep increasing
across stages. At the start of stage ``k`` each client learns what is new to
it (the part of its shard that stage ``k`` reveals, :mod:`fedfm.continual.stream`);
in every round it takes part in, it starts from the current global model and
trains on its new rows plus, with replay on, its local reservoir buffer
(:mod:`fedfm.continual.replay`). After the last round of a stage the global
model is scored on every task seen so far (row ``k`` of the accuracy matrix)
and the forgetting metrics are updated (:mod:`fedfm.continual.metrics`).

Mitigations compose: replay, a pull toward the previous stage's global model
(L2 or EWC, :mod:`fedfm.continual.regularizers`, wrapped around the
algorithm's own client hook), and per-task adapters (one trainable state per
task; task ``k``'s state starts from task ``k-1``'s final state with
``adapter_init=previous``, from the run's initial state with ``initial``, and
a fresh server optimizer serves each task).

The run is built exactly as a one-shot run (:func:`fedfm.build.build_run`):
the same data split, model, client side (codecs included), server and
simulation driver, and it splits its rounds across simulation workers the
same way. What the loop adds is the stage: each client's rows, the replay
buffers, the regularizer's anchor, the per-task states and the accuracy
matrix, all in a checkpoint section, so ``fedfm run --resume`` continues a
killed continual run where it stopped, mid-stage or between stages.

The loop is split at the clients. The server side (the stage plan, the
rounds, scoring every seen task on the server's test rows, the forgetting
metrics, per-task states, checkpoints, the run folder) is :class:`ContinualLoop`
and is the same everywhere. What happens *on* the clients at a stage's start
and end (revealing each client's new rows, its replay buffer, the regularizer's
anchor and EWC's Fisher) sits behind :class:`StageClients`: a simulation's
clients are in this process (:class:`InProcessClients`); a deployment's are
Flower nodes that do the same on their own rows when a train message tells
them the stage (:class:`fedfm.deploy.continual.NodeStages`).

Refused, each with its reason (:func:`check_supported`): client-level DP and
local DP-SGD (their accountants are calibrated for a fixed number of rounds
and fixed client data sizes; a stream changes both), data-poisoning attacks
(they rewrite the clients' rows, which the stream replaces every stage),
FLTrust (its root data has no stages) and personalization.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Callable, Protocol

import numpy as np
import torch

from fedfm.client.data import Client
from fedfm.client.peak_memory import memory_summary
from fedfm.client.state import clients_section
from fedfm.config import RunConfig
from fedfm.continual.evaluate import evaluate_tasks, pooled
from fedfm.continual.metrics import stage_metrics
from fedfm.continual.regularizers import AnchorRegularizer, RegularizedAlgorithm
from fedfm.continual.replay import client_buffer, reveal
from fedfm.continual.report import plot_continual
from fedfm.continual.stream import StreamPlan, plan_stream
from fedfm.drivers.workers import evaluation, run_in_group, start_workers
from fedfm.errors import FedfmError
from fedfm.eval.report import MetricsLog, write_json
from fedfm.eval.summary import make_summary, state_metadata
from fedfm.eval.tracking import open_tracker
from fedfm.models.adapter import ADAPTER_DIR, save_adapter
from fedfm.models.state import save_state, set_state_, state_to_bytes
from fedfm.eval.progress import RunProgress
from fedfm.registry import ATTACKS, NEEDS_ROOT_DATA, POISONS_DATA, ROBUST_RULES
from fedfm.server import checkpoint
from fedfm.server.compose import build_algorithm_fold
from fedfm.server.server import clone
from fedfm.tensor_groups import get_group, put_group

ANCHOR_SENT = "continual_anchor_stage"  # client state: the stage whose anchor it has downloaded


def check_supported(cfg: RunConfig) -> None:
    """Refuse, in one line each, what the continual loop cannot serve (module docstring: why)."""
    if ATTACKS.supports(cfg.attack.name, POISONS_DATA):
        raise FedfmError(f"continual learning cannot simulate the data attack {cfg.attack.name!r}: "
                         "the stream replaces the clients' rows every stage")
    if cfg.privacy.client_dp.enabled or cfg.privacy.dp_sgd.enabled:
        raise FedfmError("continual learning cannot be combined with privacy.client_dp or privacy.dp_sgd: their "
                         "accountants assume a fixed number of rounds and fixed client data, which a stream changes")
    if ROBUST_RULES.supports(cfg.robust.rule, NEEDS_ROOT_DATA):
        raise FedfmError(f"continual learning cannot use robust.rule={cfg.robust.rule} (its root data has no stages)")
    if cfg.personalization.method != "none":
        raise FedfmError("continual learning cannot be combined with personalization yet")


class StageTrainer:
    """The run's local trainer, seen through the current stage.

    A client with nothing to train on in this stage sits the round out; a
    client that needs the regularizer's anchor (the previous stage's global
    model) downloads it once per stage, and those bytes are charged to it.
    """

    def __init__(self, trainer, regularizer: AnchorRegularizer | None, server) -> None:
        self.trainer = trainer
        self.regularizer = regularizer
        self.server = server
        self.stage = 0
        self._anchor_bytes = 0

    def __getattr__(self, name):
        if name == "trainer":
            raise AttributeError(name)
        return getattr(self.trainer, name)

    def new_anchor(self, stage: int) -> None:
        self.stage = stage
        if self.regularizer is not None and self.regularizer.anchor is not None:
            self._anchor_bytes = len(state_to_bytes(self.regularizer.anchor))

    def local_update(self, algo, broadcast, client: Client, round_idx: int):
        if len(client.train_idx) == 0:
            return None
        if self._anchor_bytes and client.state.get(ANCHOR_SENT) != self.stage:
            client.state[ANCHOR_SENT] = self.stage
            self.server.charge(client.cid, "down", self._anchor_bytes)
        return self.trainer.local_update(algo, broadcast, client, round_idx)


def build_regularizer(cfg: RunConfig) -> AnchorRegularizer | None:
    """The configured pull toward the previous stage's global model (``continual.regularizer``), or None."""
    reg = cfg.continual.regularizer
    return None if reg.name == "none" else AnchorRegularizer(reg.name, reg.strength, reg.fisher_examples, cfg.seed)


def client_algorithm(algorithm, regularizer: AnchorRegularizer | None):
    """The algorithm the client side trains with: the regularizer composed into its own client hook."""
    return algorithm if regularizer is None else RegularizedAlgorithm(algorithm, regularizer)


class StageClients(Protocol):
    """What the loop asks of the clients at the stages' edges (module docstring); checkpointed with the loop."""

    def begin_stage(self, k: int) -> None:
        """Stage ``k`` starts (not called again when a run resumes inside it): reveal its rows."""

    def enter_stage(self, k: int) -> None:
        """Stage ``k``'s rounds are about to run (also when a run resumes inside it)."""

    def end_stage(self, k: int, global_state) -> None:
        """Stage ``k`` ended and another follows: ``global_state`` becomes the regularizer's anchor."""

    def new_task(self) -> None:
        """Per-task adapters: the server serves a new task with a fresh algorithm."""

    def write(self, tensors: dict, orders: dict) -> dict:
        """Their part of the loop's checkpoint section (JSON; tensors added to ``tensors``)."""

    def load(self, meta: dict, tensors, orders: dict) -> None:
        """Put back what :meth:`write` wrote."""


class InProcessClients:
    """The simulated clients' side of the stages, in this process (see :class:`StageClients`).

    At a stage's start every client trains on its new rows (plus its replay
    buffer, :func:`fedfm.continual.replay.reveal`); at its end the global model
    becomes the regularizer's anchor and, with EWC, every client adds its Fisher
    on the rows it trained on. The anchor's download is charged by :class:`StageTrainer`.
    """

    def __init__(self, r, plan: StreamPlan) -> None:
        self.r, self.plan = r, plan
        self.regularizer = build_regularizer(r.cfg)
        self.trainer = r.app.trainer = StageTrainer(r.app.trainer, self.regularizer, r.server)
        self.new_task()
        for c in r.clients:  # rows arrive with the stages
            c.train_idx = c.train_idx[:0]
        replay = r.cfg.continual.replay
        self.buffers = [client_buffer(replay, r.cfg.seed, c.cid) for c in r.clients] if replay.enabled else None

    def begin_stage(self, k: int) -> None:
        for i, c in enumerate(self.r.clients):
            c.train_idx = reveal(self.plan.train[k][i], None if self.buffers is None else self.buffers[i])

    def enter_stage(self, k: int) -> None:
        self.trainer.new_anchor(k)

    def end_stage(self, k: int, global_state) -> None:
        if self.regularizer is None:
            return
        r = self.r
        set_state_(r.fm.params, global_state)
        self.regularizer.end_stage(global_state, r.fm, r.enc, r.clients, [c.train_idx for c in r.clients], k)

    def new_task(self) -> None:
        self.r.app.algorithm = client_algorithm(self.r.server.algorithm, self.regularizer)

    def write(self, tensors: dict, orders: dict) -> dict:
        if self.regularizer is not None and self.regularizer.anchor is not None:
            put_group(tensors, orders, "continual/anchor", self.regularizer.anchor)
        for c in self.r.clients:
            tensors[f"continual/rows/{c.cid}"] = torch.from_numpy(np.asarray(c.train_idx, dtype=np.int64))
        return {"buffers": [b.state_dict() for b in self.buffers or []]}

    def load(self, meta: dict, tensors, orders: dict) -> None:
        if self.regularizer is not None and "continual/anchor" in orders:
            self.regularizer.anchor = get_group(tensors, orders, "continual/anchor")
        for c in self.r.clients:
            c.train_idx = tensors[f"continual/rows/{c.cid}"].numpy()
        for b, state in zip(self.buffers or [], meta["buffers"]):
            b.load_state_dict(state)


def run_continual(r, console=None, resume=None) -> dict:
    """Run a built (:func:`fedfm.build.build_run`) continual-learning job; returns its summary.

    ``resume`` (the run folder) continues a killed run from its latest checkpoint.
    """
    loop = ContinualLoop(r)
    kept = loop.restore(resume)
    group = r.sim.group = start_workers(r.cfg, r.device)  # everything read-only is built: fork now
    run_in_group(group, lambda: loop.run(kept, console))
    return loop.finish() if group is None or group.main else {}


class ContinualLoop:
    """Stages of rounds on one built run (see the module docstring)."""

    def __init__(self, r, clients: Callable[..., StageClients] = InProcessClients) -> None:
        """``r``: the run as :func:`fedfm.build.build_run` (or a deployment's server) built it;
        ``clients(r, plan)``: the clients' side of the stages."""
        cfg, cc = r.cfg, r.cfg.continual
        self.r, self.cc = r, cc
        self.plan: StreamPlan = plan_stream(cc, r.ds, [c.train_idx for c in r.clients], r.test_idx)
        self.initial = clone(r.server.global_state)
        self.clients = clients(r, self.plan)
        self.per_stage_rounds = cc.rounds_per_stage or cfg.federation.rounds
        self.task_states: list = []  # per-task adapters: task j's final state
        self.R: list[list[float | None]] = []  # R[i][j]: accuracy on task j after stage i
        self.P: list[list[float | None]] = []  # causal LM: perplexity beside the token accuracy
        self.per_stage: list[dict] = []
        self.rnd, self.start_stage, self.start_round = 0, 0, 1

    # -- checkpoints ------------------------------------------------------------------
    def sections(self, stage: int, round_in_stage: int) -> dict:
        r = self.r
        write_clients, _ = clients_section(r.clients)
        return {"clients": write_clients, "simulation": r.sim.state_dict, "continual": self._writer(stage, round_in_stage)}

    def _writer(self, stage: int, round_in_stage: int):
        """The checkpoint section of the loop's own state after round ``round_in_stage`` of ``stage``."""
        def write(tensors: dict, orders: dict) -> dict:
            for j, state in enumerate(self.task_states):
                put_group(tensors, orders, f"continual/task/{j}", state)
            return {"stage": stage, "round_in_stage": round_in_stage, "tasks": len(self.task_states), "R": self.R,
                    "P": self.P, "per_stage": self.per_stage, **self.clients.write(tensors, orders)}
        return write

    def _load(self, loop: dict, tensors, orders: dict) -> None:
        self.R, self.P, self.per_stage = loop["R"], loop["P"], loop["per_stage"]
        self.task_states = [get_group(tensors, orders, f"continual/task/{j}") for j in range(loop["tasks"])]
        self.clients.load(loop, tensors, orders)
        done = loop["round_in_stage"] == self.per_stage_rounds
        self.start_stage, self.start_round = loop["stage"] + done, 1 if done else loop["round_in_stage"] + 1

    def restore(self, resume) -> list[dict] | None:
        """When resuming, put the latest checkpoint back; the metrics records it kept."""
        r = self.r
        found = checkpoint.load_for_resume(r.out, resume, r.cfg.checkpoint.every)
        if found is None:
            return None
        meta, tensors, kept = found
        _, load_clients = clients_section(r.clients)
        loaders = {"clients": load_clients, "simulation": r.sim.load_state_dict, "continual": self._load}
        checkpoint.restore(meta, tensors, r.server, loaders)  # clients first: the loop's rows replace theirs
        self.rnd = int(meta["round"])
        return kept

    # -- the loop -------------------------------------------------------------------------
    def run(self, kept, console) -> None:
        r, cfg = self.r, self.r.cfg
        group = r.sim.group
        self.main = group is None or group.main
        tracker = open_tracker(cfg, r.out, resumed=kept is not None, first_round=self.rnd + 1) if self.main else None
        self.metrics_log = MetricsLog(r.out / "metrics.jsonl" if self.main else None, kept=kept or (), tracker=tracker)
        self.ckpt = checkpoint.Checkpointer(r.out, cfg.checkpoint.every, cfg.checkpoint.keep)
        T = self.plan.num_stages
        self.progress = RunProgress(cfg, console=console, enabled=cfg.progress and self.main)
        self.progress.rounds = T * self.per_stage_rounds
        with self.progress:
            self.progress.header(cfg, len(r.ds.texts), len(r.test_idx), r.stats, r.trainable, r.total)
            self.progress.print(f"  continual: {T} stages ({self.cc.stream}: {', '.join(self.plan.names)}), "
                                f"{self.per_stage_rounds} rounds each")
            for k in range(self.start_stage, T):
                first = self.start_round if k == self.start_stage else 1
                if first == 1:  # a new stage (a resumed one restored its clients' rows and buffers)
                    self.begin_stage(k)
                self.clients.enter_stage(k)
                for rr in range(first, self.per_stage_rounds + 1):
                    self.round(k, rr)
                self.end_stage(k)
        self.metrics_log.close()

    def begin_stage(self, k: int) -> None:
        r = self.r
        if self.cc.per_task_adapters and k > 0:  # a new task: its own state and a fresh server optimizer
            state = self.task_states[k - 1] if self.cc.adapter_init == "previous" else self.initial
            fold = build_algorithm_fold(r.cfg, r.cfg.federation.num_clients, r.trainer, r.root_client)
            r.server.start_task(*fold, state)  # copies it
            self.clients.new_task()
        self.clients.begin_stage(k)

    def round(self, k: int, rr: int) -> None:
        r, cfg, last = self.r, self.r.cfg, rr == self.per_stage_rounds
        self.rnd += 1
        record = r.sim.run_round(self.rnd, on_client=self.progress.client_done)
        record.update(stage=k, task=self.plan.names[k])
        if last and self.cc.per_task_adapters:  # every worker keeps the task's final state
            self.task_states.append(clone(r.server.global_state))
        due = last or (cfg.eval.every > 0 and self.rnd % cfg.eval.every == 0)
        if due:
            with evaluation(r.sim.group, cfg.threads):
                if self.main:
                    self.score(k, record, last)
        record["wall_s"] = time.perf_counter() - r.t_start
        self.metrics_log.write(record)
        if self.main and not last and self.ckpt.due(self.rnd):
            self.ckpt.save(self.rnd, r.server, len(self.metrics_log.records), self.sections(k, rr))
        self.progress.round_done(record)

    def score(self, k: int, record: dict, stage_end: bool) -> None:
        """Metrics on tasks ``0..k``; at a stage's end, row ``k`` of the accuracy matrix and forgetting."""
        r, T = self.r, self.plan.num_stages
        states = [r.server.global_state] * (k + 1)
        if self.cc.per_task_adapters:
            states = list(self.task_states[:k]) + [r.server.global_state]  # task k's own: the current one
        scores = evaluate_tasks(r.fm, r.enc, self.plan.test[: k + 1], states, r.cfg.eval.batch_size)
        record.update(pooled(scores, r.fm.task))
        record["task_accuracy"] = {self.plan.names[j]: m["accuracy"] for j, m in enumerate(scores)}
        if not stage_end:
            return
        self.R.append([m["accuracy"] for m in scores] + [None] * (T - k - 1))
        if r.fm.task == "causal_lm":
            self.P.append([m["perplexity"] for m in scores] + [None] * (T - k - 1))
            record["task_perplexity"] = {self.plan.names[j]: m["perplexity"] for j, m in enumerate(scores)}
        cl = stage_metrics(self.R)
        record.update(stage_end=True, accuracy_row=self.R[-1][: k + 1], **cl)
        self.per_stage.append({"stage": k, "task": self.plan.names[k], "round": self.rnd, "version": r.server.version, **cl})

    def end_stage(self, k: int) -> None:
        r = self.r
        if self.main:
            last = self.per_stage[-1]
            self.progress.print(
                f"  after stage {k} ({self.plan.names[k]}, version {r.server.version}): "
                + " ".join(f"{x:.3f}" for x in self.R[-1][: k + 1])
                + f" | average {last['average_accuracy']:.4f}"
                + ("" if last["forgetting"] is None else f" forgetting {last['forgetting']:.4f} BWT {last['backward_transfer']:+.4f}")
            )
        if k + 1 < self.plan.num_stages:
            self.clients.end_stage(k, r.server.global_state)
        if self.main and self.ckpt.due(self.rnd):  # after the stage's end: its scores, the anchor and the Fisher are in
            self.ckpt.save(self.rnd, r.server, len(self.metrics_log.records), self.sections(k, self.per_stage_rounds))

    # -- the run folder -----------------------------------------------------------------
    def finish(self) -> dict:
        r, cfg = self.r, self.r.cfg
        server = r.server
        set_state_(r.fm.params, server.global_state)
        meta = {**state_metadata(cfg, r.num_labels, r.ds.label_names, server.version),
                "continual_stages": json.dumps(self.plan.names)}
        save_state(server.global_state, r.out / "final_state.safetensors", metadata=meta)
        save_adapter(r.fm, cfg.model, r.ds.label_names, r.out / ADAPTER_DIR)  # PEFT methods: a peft folder
        if self.cc.per_task_adapters:  # every task's state, keys "task<j>/<name>"
            both = OrderedDict((f"task{j}/{k}", v) for j, s in enumerate(self.task_states) for k, v in s.items())
            save_state(both, r.out / "task_states.safetensors", metadata=meta)
        metric = "token_accuracy" if r.fm.task == "causal_lm" else "accuracy"
        records = self.metrics_log.records
        plot_continual(records, self.R, self.plan.names, r.out / "metrics.png", metric)
        summary = make_summary(cfg, records, server, r.sim, r.trainable, r.total, time.perf_counter() - r.t_start, r.out)
        summary["device"] = str(r.device)
        summary["workers"] = 1 if r.sim.group is None else r.sim.group.world
        summary["client_memory"] = memory_summary(r.fm.model, cfg.model.quantize, records, r.device)
        final = self.per_stage[-1]
        summary.update(
            average_accuracy=final["average_accuracy"],
            forgetting=final["forgetting"],
            backward_transfer=final["backward_transfer"],
            final_task_accuracy=final["current_task_accuracy"],
            continual=continual_summary(cfg, self.plan, self.per_stage_rounds, self.R, self.P, self.per_stage, metric),
        )
        write_json(r.out / "summary.json", summary)
        self.progress.summary(summary)
        return summary


def continual_summary(cfg: RunConfig, plan: StreamPlan, rounds: int, R, P, per_stage, metric: str) -> dict:
    cc = cfg.continual
    out = {
        "stream": cc.stream,
        "stages": plan.names,
        "rounds_per_stage": rounds,
        "metric": metric,
        "replay_capacity": cc.replay.capacity if cc.replay.enabled else None,
        "regularizer": None if cc.regularizer.name == "none" else cc.regularizer.model_dump(),
        "per_task_adapters": cc.per_task_adapters,
        "adapter_init": cc.adapter_init if cc.per_task_adapters else None,
        "accuracy_matrix": R,
        "per_stage": per_stage,
        "test_examples_per_task": [int(len(t)) for t in plan.test],
        "train_examples_per_stage": [int(sum(len(p) for p in parts)) for parts in plan.train],
        "sign_convention": "forgetting > 0 and backward_transfer < 0 mean old tasks got worse",
    }
    if P:
        out["perplexity_matrix"] = P
    return out
