"""The always-on server loop of federated continual learning.

The server never restarts: one :class:`~fedfm.runtime.simulation.Simulation`
runs ``rounds_per_stage`` rounds per stage, stage after stage, so every round
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

Everything else -- data loading, partitioning, the model, the local trainer,
the server composition, the wire, the byte ledger, checkpoints -- is the
one-shot run's machinery (:mod:`fedfm.runner`), reused as is. A checkpoint
adds the loop's own state (stage and round in it, each client's rows for the
stage, the replay buffers, the regularizer's anchor, the per-task states and
the accuracy matrix), so ``fedfm run --resume`` continues a killed continual
run where it stopped, mid-stage or between stages.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict

import numpy as np
import torch

from fedfm.config import RunConfig
from fedfm.continual.evaluate import evaluate_tasks, pooled
from fedfm.continual.metrics import stage_metrics
from fedfm.continual.regularizers import AnchorRegularizer, RegularizedAlgorithm
from fedfm.continual.replay import ReservoirBuffer
from fedfm.continual.report import plot_continual
from fedfm.continual.stream import StreamPlan, plan_stream
from fedfm.data.encode import encode
from fedfm.errors import FedfmError
from fedfm.eval.report import MetricsLog, write_json
from fedfm.models import build_model
from fedfm.models.state import get_state, save_state, set_state_, state_to_bytes
from fedfm.runtime import checkpoint
from fedfm.runtime.client import Client, LocalTrainer, derive_seed
from fedfm.runtime.compose import build_server
from fedfm.runtime.simulation import Simulation

ANCHOR_SENT = "continual_anchor_stage"  # client state: the stage whose anchor it has downloaded


def check_supported(cfg: RunConfig) -> None:
    """Refuse, in one line each, what the continual loop does not serve yet."""
    if cfg.attack.name != "none":
        raise FedfmError("continual learning does not simulate attacks yet (attack.name must be none)")
    if cfg.privacy.client_dp.enabled or cfg.privacy.dp_sgd.enabled:
        raise FedfmError("continual learning cannot be combined with privacy.client_dp or privacy.dp_sgd yet")
    if cfg.robust.rule == "fltrust":
        raise FedfmError("continual learning cannot use robust.rule=fltrust (its root data has no stages)")
    if cfg.personalization.method != "none":
        raise FedfmError("continual learning cannot be combined with personalization yet")


class StageTrainer:
    """The run's :class:`LocalTrainer`, seen through the current stage.

    A client with nothing to train on in this stage sits the round out; a
    client that needs the regularizer's anchor (the previous stage's global
    model) downloads it once per stage, and those bytes are charged to it.
    """

    def __init__(self, trainer: LocalTrainer, regularizer: AnchorRegularizer | None) -> None:
        self.trainer = trainer
        self.regularizer = regularizer
        self.ledger = None  # the simulation's byte ledger, set once it exists
        self.stage = 0
        self._anchor_bytes = 0

    def new_anchor(self, stage: int) -> None:
        self.stage = stage
        if self.regularizer is not None and self.regularizer.anchor is not None:
            self._anchor_bytes = len(state_to_bytes(self.regularizer.anchor))

    def local_update(self, algo, broadcast, client: Client, round_idx: int):
        if len(client.train_idx) == 0:
            return None
        if self._anchor_bytes and client.state.get(ANCHOR_SENT) != self.stage:
            client.state[ANCHOR_SENT] = self.stage
            self.ledger.record(client.cid, "down", self._anchor_bytes)
        return self.trainer.local_update(algo, broadcast, client, round_idx)


def make_algorithm(cfg: RunConfig, num_clients: int, trainer: LocalTrainer, regularizer: AnchorRegularizer | None):
    """The run's server side (algorithm + robust fold) with the regularizer composed into its client hook."""
    server = build_server(cfg, num_clients=num_clients, trainer=trainer)
    algorithm = server.algorithm if regularizer is None else RegularizedAlgorithm(server.algorithm, regularizer)
    return server, algorithm


def clone(state) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, v.detach().clone()) for k, v in state.items())


def run_continual(cfg: RunConfig, console=None, resume=None) -> dict:
    """Run a federated continual-learning job; returns its summary (also written to summary.json).

    ``resume`` (the run folder) continues a killed run from its latest checkpoint.
    """
    from fedfm.progress import RunProgress
    from fedfm.runner import build_clients, make_summary, split_holdout, start_run, state_metadata

    check_supported(cfg)
    cc = cfg.continual
    device, out, t_start, ds = start_run(cfg)
    num_labels = len(ds.label_names) if cfg.model.task == "seq_cls" else None
    test_idx, clients, stats = build_clients(cfg, ds, split_holdout(cfg, ds))
    plan = plan_stream(cc, ds, [c.train_idx for c in clients], test_idx)
    write_json(out / "partition.json", stats)

    fm = build_model(cfg.model, num_labels, seed=cfg.seed, device=device)
    enc = encode(ds.texts, fm.tokenizer, cfg.model.max_length, ds.labels if cfg.model.task == "seq_cls" else None)
    trainer = LocalTrainer(fm, enc, cfg.train, seed=cfg.seed)
    reg = cc.regularizer
    regularizer = None if reg.name == "none" else AnchorRegularizer(reg.name, reg.strength, reg.fisher_examples, cfg.seed)
    server, algorithm = make_algorithm(cfg, len(clients), trainer, regularizer)
    initial = get_state(fm.params)
    # The clients of the simulation: same ids and private state dicts; their training rows change per stage.
    stage_clients = [Client(cid=c.cid, train_idx=c.train_idx[:0], test_idx=c.test_idx) for c in clients]
    stage_trainer = StageTrainer(trainer, regularizer)
    sim = Simulation(stage_trainer, algorithm, stage_clients, cfg.federation.clients_per_round, cfg.seed, initial,
                     secure=cfg.privacy.secure_aggregation)
    stage_trainer.ledger = sim.ledger
    buffers = None
    if cc.replay.enabled:
        buffers = [ReservoirBuffer(cc.replay.capacity, seed=derive_seed(cfg.seed, c.cid, 0x4E9)) for c in clients]
    per_stage_rounds = cc.rounds_per_stage or cfg.federation.rounds
    trainable = sum(p.numel() for p in fm.params.values())
    total = sum(p.numel() for p in fm.model.parameters())

    task_states: list = []  # per-task adapters: task j's final state
    R: list[list[float | None]] = []  # R[i][j]: accuracy on task j after stage i
    P: list[list[float | None]] = []  # causal LM: perplexity beside the token accuracy
    per_stage: list[dict] = []
    T = plan.num_stages
    rnd, start_stage, start_round, kept = 0, 0, 1, None
    ckpt = checkpoint.Checkpointer(out, cfg.checkpoint.every, cfg.checkpoint.keep)
    if (found := checkpoint.load_for_resume(out, resume, cfg.checkpoint.every)) is not None:
        meta, tensors, kept = found
        loop = checkpoint.section(meta, "continual")
        rnd, R, P, per_stage = int(meta["round"]), loop["R"], loop["P"], loop["per_stage"]
        task_states = [checkpoint.get_group(tensors, meta["orders"], f"continual/task/{j}") for j in range(loop["tasks"])]
        if regularizer is not None and "continual/anchor" in meta["orders"]:
            regularizer.anchor = checkpoint.get_group(tensors, meta["orders"], "continual/anchor")
        for sc in stage_clients:
            sc.train_idx = tensors[f"continual/rows/{sc.cid}"].numpy()
        for b, state in zip(buffers or [], loop["buffers"]):
            b.load_state_dict(state)
        checkpoint.restore(meta, tensors, sim, server, stage_clients)  # last: it also sets the RNG states
        done = loop["round_in_stage"] == per_stage_rounds
        start_stage, start_round = loop["stage"] + done, 1 if done else loop["round_in_stage"] + 1

    def loop_state(stage: int, round_in_stage: int):
        """The checkpoint section of the loop's own state after round ``round_in_stage`` of ``stage``."""
        def write(tensors: dict, orders: dict) -> dict:
            for j, state in enumerate(task_states):
                checkpoint.put_group(tensors, orders, f"continual/task/{j}", state)
            if regularizer is not None and regularizer.anchor is not None:
                checkpoint.put_group(tensors, orders, "continual/anchor", regularizer.anchor)
            for sc in stage_clients:
                tensors[f"continual/rows/{sc.cid}"] = torch.from_numpy(np.asarray(sc.train_idx, dtype=np.int64))
            return {"stage": stage, "round_in_stage": round_in_stage, "tasks": len(task_states), "R": R, "P": P,
                    "per_stage": per_stage, "buffers": [b.state_dict() for b in buffers or []]}
        return {"continual": write}

    metrics_log = MetricsLog(out / "metrics.jsonl")
    for record in kept or ():  # metrics.jsonl truncated to the checkpoint's round
        metrics_log.write(record)
    progress = RunProgress(cfg, console=console, enabled=cfg.progress)
    progress.rounds = T * per_stage_rounds
    with progress:
        progress.header(cfg, len(ds.texts), len(test_idx), stats, trainable, total)
        progress.print(f"  continual: {T} stages ({cc.stream}: {', '.join(plan.names)}), {per_stage_rounds} rounds each")
        for k in range(start_stage, T):
            first = start_round if k == start_stage else 1
            if first == 1:  # a new stage (a resumed one restored its clients' rows and buffers)
                if cc.per_task_adapters and k > 0:  # a new task: its own state and a fresh server optimizer
                    sim.global_state = clone(task_states[k - 1] if cc.adapter_init == "previous" else initial)
                    server, sim.algorithm = make_algorithm(cfg, len(clients), trainer, regularizer)
                for i, sc in enumerate(stage_clients):
                    new = plan.train[k][i]
                    sc.train_idx = new if buffers is None else buffers[i].training_rows(new)
                    if buffers is not None:
                        buffers[i].offer(new)
            stage_trainer.new_anchor(k)
            for r in range(first, per_stage_rounds + 1):
                rnd += 1
                record = sim.run_round(rnd, on_client=progress.client_done)
                record.update(stage=k, task=plan.names[k])
                record.update(server.robust_record())
                if r == per_stage_rounds:
                    if cc.per_task_adapters:
                        task_states.append(clone(sim.global_state))
                    scores = score_seen(fm, enc, plan, k, sim.global_state, task_states if cc.per_task_adapters else None,
                                        cfg.eval.batch_size)
                    R.append([m["accuracy"] for m in scores] + [None] * (T - k - 1))
                    if fm.task == "causal_lm":
                        P.append([m["perplexity"] for m in scores] + [None] * (T - k - 1))
                    cl = stage_metrics(R)
                    record.update(pooled(scores, fm.task))
                    record.update(stage_end=True, accuracy_row=R[-1][: k + 1],
                                  task_accuracy={plan.names[j]: m["accuracy"] for j, m in enumerate(scores)}, **cl)
                    if fm.task == "causal_lm":
                        record["task_perplexity"] = {plan.names[j]: m["perplexity"] for j, m in enumerate(scores)}
                    per_stage.append({"stage": k, "task": plan.names[k], "round": rnd, "version": sim.version, **cl})
                elif cfg.eval.every > 0 and rnd % cfg.eval.every == 0:
                    scores = score_seen(fm, enc, plan, k, sim.global_state, task_states if cc.per_task_adapters else None,
                                        cfg.eval.batch_size)
                    record.update(pooled(scores, fm.task))
                    record["task_accuracy"] = {plan.names[j]: m["accuracy"] for j, m in enumerate(scores)}
                record["wall_s"] = time.perf_counter() - t_start
                metrics_log.write(record)
                if r < per_stage_rounds and ckpt.due(rnd):
                    ckpt.save(rnd, sim, server, stage_clients, len(metrics_log.records), sections=loop_state(k, r))
                progress.round_done(record)
            last = per_stage[-1]
            progress.print(
                f"  after stage {k} ({plan.names[k]}, version {sim.version}): "
                + " ".join(f"{x:.3f}" for x in R[-1][: k + 1])
                + f" | average {last['average_accuracy']:.4f}"
                + ("" if last["forgetting"] is None else f" forgetting {last['forgetting']:.4f} BWT {last['backward_transfer']:+.4f}")
            )
            if regularizer is not None and k + 1 < T:
                set_state_(fm.params, sim.global_state)
                regularizer.end_stage(sim.global_state, fm, enc, stage_clients, [c.train_idx for c in stage_clients], k)
            if ckpt.due(rnd):  # after the stage's end: its scores, the anchor and the Fisher are in
                ckpt.save(rnd, sim, server, stage_clients, len(metrics_log.records), sections=loop_state(k, per_stage_rounds))
    metrics_log.close()

    set_state_(fm.params, sim.global_state)
    meta = {**state_metadata(cfg, num_labels, ds.label_names, sim.version), "continual_stages": json.dumps(plan.names)}
    save_state(sim.global_state, out / "final_state.safetensors", metadata=meta)
    if cc.per_task_adapters:  # every task's state, keys "task<j>/<name>"
        both = OrderedDict((f"task{j}/{k}", v) for j, s in enumerate(task_states) for k, v in s.items())
        save_state(both, out / "task_states.safetensors", metadata=meta)
    metric = "token_accuracy" if fm.task == "causal_lm" else "accuracy"
    plot_continual(metrics_log.records, R, plan.names, out / "metrics.png", metric)
    summary = make_summary(cfg, metrics_log.records, sim, trainable, total, time.perf_counter() - t_start, out)
    summary["device"] = str(device)
    final = per_stage[-1]
    summary.update(
        average_accuracy=final["average_accuracy"],
        forgetting=final["forgetting"],
        backward_transfer=final["backward_transfer"],
        final_task_accuracy=final["current_task_accuracy"],
        continual=continual_summary(cfg, plan, per_stage_rounds, R, P, per_stage, metric),
    )
    write_json(out / "summary.json", summary)
    progress.summary(summary)
    return summary


def score_seen(fm, enc, plan: StreamPlan, k: int, current, task_states, batch_size: int) -> list[dict]:
    """Metrics on tasks ``0..k``: with the current global model, or each task's own state (per-task adapters)."""
    if task_states is None:
        states = [current] * (k + 1)
    else:
        states = list(task_states[:k]) + [current]
    return evaluate_tasks(fm, enc, plan.test[: k + 1], states, batch_size)


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
