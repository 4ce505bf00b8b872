"""Run orchestration: config -> data, model, clients, algorithm -> rounds -> outputs.

Read top to bottom, this is one federated run:

1. load the dataset, hold out a global test set, partition the rest across
   clients and give each client a local train/test split;
2. build the model once (frozen base + trainable state) and tokenize once;
3. run rounds on the simulation runtime, evaluating on the configured cadence;
4. write the run folder: config.yaml, partition.json, metrics.jsonl,
   summary.json, final_state.safetensors, metrics.png.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import yaml

from fedfm.compression import check_compression, make_compressor
from fedfm.compression.report import compression_summary
from fedfm.config import RunConfig, load_config, to_dict, validate
from fedfm.data.encode import encode
from fedfm.data.partition import partition, split_client, train_test_split
from fedfm.data.sources import load_text_dataset
from fedfm.data.stats import partition_stats
from fedfm.errors import FedfmError
from fedfm.eval.backdoor import backdoor_success
from fedfm.eval.evaluate import evaluate
from fedfm.eval.personal import evaluate_personalized, personal_summary
from fedfm.eval.report import MetricsLog, plot_metrics, write_json
from fedfm.models import build_model, resolve_device
from fedfm.models.chain import base_name
from fedfm.models.state import get_state, save_state, set_state_, state_nbytes
from fedfm.personalization import PersonalTrainer, build_plan, check_personalization
from fedfm.robustness.attacks import Attack
from fedfm.robustness.poison import check_poisoning, prepare_poisoning
from fedfm.runtime import checkpoint
from fedfm.runtime.asynchronous import AsyncEngine
from fedfm.runtime.batched import BatchedTrainer, check_batching
from fedfm.runtime.client import Client, LocalTrainer
from fedfm.runtime.compose import build_dp_sgd, build_server
from fedfm.runtime.devices import Fleet, check_devices, training_footprint_mb
from fedfm.runtime.hetlora import HetRankTrainer
from fedfm.runtime.simulation import Simulation
from fedfm.runtime.workers import cores, is_main_process, start_workers

log = logging.getLogger("fedfm")


def resolve_config(config, overrides: Iterable[str] = ()) -> RunConfig:
    if config is None or isinstance(config, (str, Path)):
        return load_config(config, overrides)
    if isinstance(config, RunConfig):
        data = to_dict(config)
    elif isinstance(config, dict):
        data = dict(config)
    else:
        raise FedfmError(f"config must be a RunConfig, a dict or a YAML path, not {type(config).__name__}")
    from fedfm.config.load import apply_overrides

    return validate(apply_overrides(data, overrides))


def run_dir_for(cfg: RunConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_holdout(cfg: RunConfig, ds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool for the clients, global test set, the server's FLTrust root set).

    The global holdout (``data.test_fraction``, stratified by label) is the
    test set, except with ``robust.rule=fltrust``: then ``robust.root_examples``
    of it, drawn uniformly with the run seed, are the server's clean root
    data and the test set is the rest — no client trains on the root data and
    no model is tested on it. The root set is empty for every other rule.
    """
    pool, test_idx = train_test_split(len(ds.texts), cfg.data.test_fraction, labels=ds.labels, seed=cfg.seed)
    root = np.zeros(0, dtype=np.int64)
    if cfg.robust.rule == "fltrust":
        k = cfg.robust.root_examples
        if k >= len(test_idx):
            raise FedfmError(
                f"robust.root_examples={k} must be smaller than the {len(test_idx)} held-out examples "
                f"(data.test_fraction={cfg.data.test_fraction}) it is carved out of"
            )
        pick = np.random.default_rng([cfg.seed, 0xF1]).permutation(len(test_idx))[:k]
        root = np.sort(test_idx[pick])
        test_idx = np.setdiff1d(test_idx, root)
    return pool, test_idx, root


def build_clients(cfg: RunConfig, ds, holdout=None) -> tuple[np.ndarray, list[Client], dict]:
    """Global test holdout, partition of the rest, and each client's local split.

    ``holdout`` is :func:`split_holdout`'s result when the caller already has it.
    """
    pool, test_idx, _ = split_holdout(cfg, ds) if holdout is None else holdout
    p = cfg.federation.partition
    parts = partition(
        cfg.federation.num_clients,
        p.scheme,
        num_examples=len(pool),
        labels=None if ds.labels is None else ds.labels[pool],
        groups=None if ds.groups is None else [ds.groups[i] for i in pool],
        alpha=p.alpha,
        min_examples=p.min_examples,
        seed=cfg.seed,
    )
    clients = []
    for cid, part in enumerate(parts):
        train, test = split_client(pool[part], cfg.data.client_test_fraction, seed=cfg.seed * 1_000_003 + cid)
        clients.append(Client(cid=cid, train_idx=train, test_idx=test))
    num_classes = None if ds.label_names is None else len(ds.label_names)
    train_parts = [c.train_idx for c in clients]
    stats = partition_stats(train_parts, ds.labels, num_classes)
    if cfg.eval.max_test_examples is not None and len(test_idx) > cfg.eval.max_test_examples:
        rng = np.random.default_rng(cfg.seed)
        test_idx = np.sort(rng.choice(test_idx, cfg.eval.max_test_examples, replace=False))
    return test_idx, clients, stats


def start_run(cfg: RunConfig):
    """The common start of every run: ``(device, run folder, start time, dataset)``.

    Resolves the device (failing before anything is written when a GPU is
    absent), writes config.yaml, sets threads and seeds, loads the dataset.
    """
    device = resolve_device(cfg.device)
    out = run_dir_for(cfg)
    if is_main_process():  # under torchrun only rank 0 writes the run folder
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    ds = load_text_dataset(cfg.data, cfg.model.task, seed=cfg.seed)
    if cfg.model.task == "seq_cls" and ds.labels is None:
        raise FedfmError(f"task seq_cls needs labels, but dataset {cfg.data.dataset!r} has none")
    return device, out, t_start, ds


def state_metadata(cfg: RunConfig, num_labels: int | None, label_names, version: int) -> dict[str, str]:
    """The safetensors metadata of a run's final state: what base, task and labels it belongs to."""
    return {
        "model": base_name(cfg.model),
        "task": cfg.model.task,
        "method": cfg.model.method,
        "num_labels": str(num_labels or 0),
        "label_names": json.dumps(label_names or []),
        "version": str(version),
    }


def run(config=None, overrides: Iterable[str] = (), console=None, resume=None) -> dict:
    """Run one federated job and return its summary (also written to summary.json).

    ``resume=RUN_DIR`` continues a killed run from its latest checkpoint, with
    the run's own config.yaml (fedfm.runtime.checkpoint).
    """
    cfg = resolve_config(config, overrides) if resume is None else checkpoint.resume_config(resume, config, overrides)
    check_personalization(cfg)  # one-line errors for combinations personalization cannot serve
    check_compression(cfg)  # e.g. upload codecs with secure aggregation
    check_devices(cfg)  # device profiles, HetLoRA ranks, asynchronous training
    check_batching(cfg)  # train.batch_clients
    if cfg.continual.enabled:  # data arrives in stages: the always-on loop of fedfm.continual
        from fedfm.continual.loop import run_continual

        return run_continual(cfg, console=console, resume=resume)
    device, out, t_start, ds = start_run(cfg)
    attack = Attack(**cfg.attack.model_dump(), seed=cfg.seed, server_lr=cfg.algorithm.server_lr)  # "none": no attackers
    num_labels = len(ds.label_names) if cfg.model.task == "seq_cls" else None
    eval_backdoor = cfg.eval.backdoor or attack.name == "backdoor"
    check_poisoning(attack, cfg.model.task, num_labels, eval_backdoor)
    holdout = split_holdout(cfg, ds)
    test_idx, clients, stats = build_clients(cfg, ds, holdout)
    if is_main_process():
        write_json(out / "partition.json", stats)

    fm = build_model(cfg.model, num_labels, seed=cfg.seed, device=device)  # loads model.init_state when set
    enc = encode(ds.texts, fm.tokenizer, cfg.model.max_length, ds.labels if cfg.model.task == "seq_cls" else None)
    backdoor_rows, poisoned_rows = None, {}
    if attack.poisons_data or eval_backdoor:  # poisoned / triggered rows, tokenized once, appended to enc
        poisoned = prepare_poisoning(attack, clients, attack.malicious(len(clients)), ds.texts, enc, fm.tokenizer,
                                     cfg.model.max_length, num_labels, test_idx, eval_backdoor)
        enc, backdoor_rows, poisoned_rows = poisoned.enc, poisoned.backdoor_rows, poisoned.poisoned_rows

    dp_sgd = build_dp_sgd(cfg, fm, enc, clients)  # local sample-level DP-SGD (privacy.dp_sgd) or None
    trainer = LocalTrainer(fm, enc, cfg.train, seed=cfg.seed, dp_sgd=dp_sgd)
    trainable = sum(p.numel() for p in fm.params.values())
    total = sum(p.numel() for p in fm.model.parameters())
    fleet = Fleet(cfg.devices, len(clients), cfg.seed, footprint_mb=training_footprint_mb(fm.model, trainable))
    full_rank = cfg.model.lora.r if any(p.lora_rank is not None for p in cfg.devices.profiles) else None
    if full_rank is not None:  # HetLoRA: each client trains and uploads only its own rank
        trainer = HetRankTrainer(trainer, fleet.rank, full_rank)
    if cfg.train.batch_clients > 1:  # several clients per forward/backward (fedfm.runtime.batched)
        trainer = BatchedTrainer(trainer, cfg.train.batch_clients)
    plan = build_plan(cfg.personalization, fm)  # personal tensors that never leave the clients, or None
    if plan is not None:
        trainer = PersonalTrainer(trainer, plan)
    initial_state = get_state(fm.params) if plan is None else plan.shared(get_state(fm.params))  # what travels
    root = holdout[2]  # FLTrust: the server trains on its root data as a pseudo-client
    root_client = Client(cid=len(clients), train_idx=root, test_idx=root[:0]) if len(root) else None
    server = build_server(cfg, num_clients=len(clients), trainer=trainer, root_client=root_client)
    algorithm = server.algorithm
    sim = Simulation(
        trainer, algorithm, clients, cfg.federation.clients_per_round, cfg.seed, initial_state, attack=attack,
        secure=cfg.privacy.secure_aggregation, compressor=make_compressor(cfg), fleet=fleet, full_rank=full_rank,
    )
    sim.ema_decay = cfg.algorithm.ema_decay
    if cfg.asynchronous.enabled:  # each "round" is one buffered server step on the virtual clock
        sim.asynchronous = AsyncEngine(sim, cfg.asynchronous)

    def do_eval(record: dict) -> None:
        set_state_(fm.params, sim.released_state if plan is None else plan.global_model(sim.released_state))
        metrics = evaluate(fm, enc, test_idx, clients, cfg.eval.batch_size, per_client=cfg.eval.clients)
        record.update(metrics)
        if backdoor_rows is not None:
            record["backdoor_success_rate"] = backdoor_success(fm, enc, backdoor_rows, cfg.eval.batch_size)
        if plan is not None and cfg.eval.clients:  # each client's own model on its local test split
            record.update(evaluate_personalized(fm, enc, clients, plan, sim.released_state, cfg.eval.batch_size))

    engine = sim.asynchronous  # its clients in flight are a checkpoint section
    ckpt = checkpoint.Checkpointer(out, cfg.checkpoint.every, cfg.checkpoint.keep,
                                   sections=None if engine is None else {"asynchronous": engine.state_dict})
    start_round, kept = 1, None
    if (found := checkpoint.load_for_resume(out, resume, cfg.checkpoint.every)) is not None:
        ckpt_meta, ckpt_tensors, kept = found
        checkpoint.restore(ckpt_meta, ckpt_tensors, sim, server, clients, dp_sgd)
        if engine is not None:
            engine.load_state_dict(checkpoint.section(ckpt_meta, "asynchronous"), ckpt_tensors, ckpt_meta["orders"])
        start_round = ckpt_meta["round"] + 1
    # Everything read-only is built: split the rounds across worker processes (fedfm.runtime.workers).
    group = start_workers(cfg, device)
    sim.group = group
    main = group is None or group.main  # only the main process evaluates and writes
    try:
        metrics_log, stop_reason, progress = run_rounds(cfg, sim, server, dp_sgd, clients, out, main, kept, start_round,
                                              do_eval, ckpt, progress_args=(console, len(ds.texts), len(test_idx),
                                                                            stats, trainable, total), t_start=t_start)
    except BaseException:
        if group is not None:
            group.fail()  # a forked worker leaves here; the main process stops its workers
        raise
    if group is not None:
        group.close()  # a forked worker leaves here
        if not main:
            return {}

    final_state = sim.released_state if plan is None else plan.global_model(sim.released_state)  # + initial personal
    set_state_(fm.params, final_state)
    meta = state_metadata(cfg, num_labels, ds.label_names, sim.version)
    if plan is not None:
        meta["personal_tensors_initial"] = json.dumps(list(plan.personal_keys))  # clients keep their own
    save_state(final_state, out / "final_state.safetensors", metadata=meta)
    if plan is not None and (personal := plan.personal_states(clients)):
        save_state(personal, out / "personal_states.safetensors", metadata={"method": plan.method})
    plot_metrics(metrics_log.records, out / "metrics.png", cfg.model.task)
    summary = make_summary(cfg, metrics_log.records, sim, trainable, total, time.perf_counter() - t_start, out)
    summary["device"] = str(device)
    summary["workers"] = 1 if group is None else group.world  # simulation processes (fedfm.runtime.workers)
    if plan is not None:
        summary["personalization"] = personal_summary(plan, clients, metrics_log.records, cfg.model.task)
    if device.type == "cuda":
        summary["device_name"] = torch.cuda.get_device_name(device)
    summary["stop_reason"] = stop_reason
    if fleet.enabled:
        summary["devices"] = fleet.summary(sim.steps_of)
    if fleet.enabled or sim.asynchronous is not None:
        summary["virtual_s"] = sim.clock
    if sim.asynchronous is not None:
        summary["asynchronous"] = sim.asynchronous.summary()
    if poisoned_rows:
        summary["poisoned_rows"] = {str(c): k for c, k in poisoned_rows.items()}
    if root_client is not None:
        summary["fltrust_root_examples"] = len(root_client.train_idx)
    if server.accountant is not None:
        summary["privacy"] = server.privacy_summary()
    if dp_sgd is not None:
        summary.setdefault("privacy", {})["dp_sgd"] = dp_sgd.summary()
    write_json(out / "summary.json", summary)
    progress.summary(summary)
    return summary




def run_rounds(cfg, sim, server, dp_sgd, clients, out, main, kept, start_round, do_eval, ckpt, progress_args, t_start):
    """The round loop, run by every worker; only the main process evaluates and writes.

    Returns ``(metrics_log, stop_reason, progress)``.
    """
    from fedfm.progress import RunProgress

    console, *header = progress_args
    metrics_log = MetricsLog(out / "metrics.jsonl" if main else None)
    for kept_record in kept or ():  # metrics.jsonl truncated to the checkpoint's round
        metrics_log.write(kept_record)
    stop_reason = None
    rounds = cfg.federation.rounds
    with RunProgress(cfg, console=console, enabled=cfg.progress and main) as progress:
        progress.header(cfg, *header)
        if cfg.eval.every > 0 and kept is None:
            record = {"round": 0, "version": 0, **sim.ledger.snapshot()}
            with evaluation(sim.group, cfg.threads):
                if main:
                    do_eval(record)
            if main:
                record["wall_s"] = time.perf_counter() - t_start
                metrics_log.write(record)
                progress.round_done(record)
        for rnd in range(start_round, rounds + 1):
            if not server.budget_allows_next_round():
                stop_reason = f"privacy budget: round {rnd} would exceed epsilon={server.target_epsilon}"
                progress.print(f"  stopped before round {rnd}: {stop_reason}")
                break
            if dp_sgd is not None and dp_sgd.exhausted():
                stop_reason = f"dp_sgd budget: no client can train again within epsilon={dp_sgd.target_epsilon}"
                progress.print(f"  stopped before round {rnd}: {stop_reason}")
                break
            record = sim.run_round(rnd, on_client=progress.client_done)
            sim.update_ema()  # algorithm.ema_decay: the released model averages the versions
            if server.accountant is not None and "aborted" not in record:  # an aborted round releases nothing
                server.accountant.step()
            record.update(server.privacy_record())
            record.update(server.robust_record())
            if dp_sgd is not None:
                record.update(dp_sgd.round_record())  # dp_sgd_epsilon: the largest client epsilon so far
            last = rnd == rounds or not server.budget_allows_next_round() or (dp_sgd is not None and dp_sgd.exhausted())
            if (cfg.eval.every > 0 and rnd % cfg.eval.every == 0) or last:
                with evaluation(sim.group, cfg.threads):
                    if main:
                        do_eval(record)
            record["wall_s"] = time.perf_counter() - t_start
            metrics_log.write(record)
            if main and ckpt.due(rnd):  # numbered global version + server, client, privacy and RNG state
                ckpt.save(rnd, sim, server, clients, len(metrics_log.records), dp_sgd)
            progress.round_done(record)
    metrics_log.close()
    return metrics_log, stop_reason, progress


@contextlib.contextmanager
def evaluation(group, threads: int | None):
    """Every worker enters; the main one evaluates on every core while the others wait at a barrier.

    (Letting the others train the next round meanwhile oversubscribes the cores:
    measured on the default job, each evaluation took twice as long.)
    """
    if group is None:
        yield
        return
    before = torch.get_num_threads()
    if group.main:
        torch.set_num_threads(threads or cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)
        group.barrier()


def make_summary(cfg: RunConfig, records: list[dict], sim: Simulation, trainable: int, total: int, wall: float, out: Path) -> dict:
    last = records[-1]
    key = "perplexity" if cfg.model.task == "causal_lm" else "accuracy"
    final = {k: v for k, v in last.items() if k.startswith(("test_", "client_"))}
    summary = {
        "name": cfg.name,
        "task": cfg.model.task,
        "model": base_name(cfg.model),
        "method": cfg.model.method,
        "start_from": cfg.model.start_from,
        "algorithm": cfg.algorithm.name,
        "num_clients": cfg.federation.num_clients,
        "clients_per_round": cfg.federation.clients_per_round,
        "rounds": last["round"],
        "final_version": sim.version,
        "metric": key,
        f"final_{key}": last.get(f"test_{key}"),
        **({"backdoor_success_rate": last["backdoor_success_rate"]} if "backdoor_success_rate" in last else {}),
        "final": final,
        "bytes_down_total": sim.ledger.total["down"],
        "bytes_up_total": sim.ledger.total["up"],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_state_bytes": state_nbytes(sim.global_state),
        # upload bytes and compression factors vs the full float32 model and the trainable state
        "compression": compression_summary(cfg, sim, total, state_nbytes(sim.global_state)),
        "rejected_updates": len(sim.rejected),
        "attack": cfg.attack.name,
        "malicious_clients": sorted(sim.malicious),
        "robust_rule": cfg.robust.rule,
        "wall_s": wall,
        "run_dir": str(out),
        "state_file": str(out / "final_state.safetensors"),
    }
    return summary
