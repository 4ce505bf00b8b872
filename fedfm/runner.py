"""Run orchestration: ``fedfm run`` reads as build -> loop -> finish.

1. **build** (:mod:`fedfm.build`): data, clients, model, the client side, the
   server, the driver; restore the latest checkpoint when resuming; fork the
   simulation workers once everything read-only is built;
2. **loop** (:func:`run_rounds`): the driver runs round after round (or
   asynchronous server step after step), evaluating on the configured cadence,
   logging metrics.jsonl and checkpointing;
3. **finish** (:func:`finish`): the run folder: config.yaml (written at build),
   partition.json, metrics.jsonl, summary.json, final_state.safetensors (and, for
   PEFT methods, the same state as a peft adapter folder adapter/), metrics.png.

The run owns its folder from before the build to the end (:mod:`fedfm.run_folder`:
a lock, a run id in run.json that its checkpoints carry, no leftovers from a
failed start).

Continual runs (``continual.enabled``) build the same way and loop over
stages (:mod:`fedfm.drivers.continual`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Iterable

import torch

from fedfm import run_folder
from fedfm.build import Run, build_run, run_dir_for
from fedfm.client.batched import check_batching
from fedfm.client.peak_memory import memory_summary
from fedfm.compression import check_compression
from fedfm.config import resolve_config
from fedfm.drivers.continual import check_supported as check_continual
from fedfm.drivers.continual import run_continual
from fedfm.drivers.devices import check_devices
from fedfm.drivers.workers import evaluation, is_main_process, run_in_group, start_workers
from fedfm.eval.backdoor import backdoor_success
from fedfm.eval.evaluate import evaluate
from fedfm.eval.personal import evaluate_personalized, personal_summary
from fedfm.eval.report import MetricsLog, plot_metrics, write_json
from fedfm.eval.summary import make_summary, state_metadata
from fedfm.eval.tracking import check_tracking, open_tracker
from fedfm.models.adapter import ADAPTER_DIR, save_adapter
from fedfm.models.state import save_state, set_state_
from fedfm.personalization import check_personalization
from fedfm.eval.progress import RunProgress
from fedfm.client.state import clients_section
from fedfm.server import checkpoint

log = logging.getLogger("fedfm")


def run(config=None, overrides: Iterable[str] = (), console=None, resume=None, overwrite: bool = False) -> dict:
    """Run one federated job and return its summary (also written to summary.json).

    ``resume=RUN_DIR`` continues a killed run from its latest checkpoint, with
    the run's own config.yaml (fedfm.server.checkpoint). The run owns its
    folder while it runs (:mod:`fedfm.run_folder`): a folder in use, or a new
    run into a folder that holds files, is refused unless ``overwrite`` (clear
    it first); a failed start leaves nothing behind; an OS error writing the
    folder is a one-line error.
    """
    cfg = resolve_config(config, overrides) if resume is None else checkpoint.resume_config(resume, config, overrides)
    check_personalization(cfg)  # one-line errors for combinations personalization cannot serve
    check_compression(cfg)  # e.g. upload codecs with secure aggregation
    check_devices(cfg)  # device profiles, HetLoRA ranks, asynchronous training
    check_batching(cfg)  # train.batch_clients
    check_tracking(cfg)  # tracking.kind: its package is installed
    if cfg.continual.enabled:
        check_continual(cfg)
    folder = run_folder.claim(run_dir_for(cfg), resume=resume is not None, overwrite=overwrite,
                              unique=cfg.out is None, lock=is_main_process())
    cfg = cfg.model_copy(update={"out": str(folder.path)})  # an unnamed run's folder, now taken
    with folder, run_folder.io_errors():
        r = build_run(cfg)
        folder.started()  # data and model are loaded: from here on a failure keeps the folder for --resume
        return run_built(r, console, resume)


def run_built(r: Run, console, resume) -> dict:
    """Loop a built run to its end (continual runs: stage after stage); the summary."""
    if r.cfg.continual.enabled:  # data arrives in stages: the always-on loop over stages
        return run_continual(r, console=console, resume=resume)
    kept, start_round = restore(r, resume)
    group = r.sim.group = start_workers(r.cfg, r.device)  # everything read-only is built: fork now
    main = group is None or group.main  # only the main process evaluates and writes
    metrics_log, stop_reason, progress = run_in_group(group, lambda: run_rounds(r, main, kept, start_round, console))
    return finish(r, metrics_log.records, stop_reason, progress) if main else {}


def restore(r: Run, resume) -> tuple[list[dict] | None, int]:
    """When resuming, put the latest checkpoint back: ``(metrics records kept, first round to run)``."""
    found = checkpoint.load_for_resume(r.out, resume, r.cfg.checkpoint.every)
    if found is None:
        return None, 1
    meta, tensors, kept = found
    checkpoint.restore(meta, tensors, r.server, {name: load for name, (_, load) in sections(r).items()})
    return kept, meta["round"] + 1


def sections(r: Run) -> dict:
    """The checkpoint sections of a run besides the server, ``name -> (write, load)``: clients, driver, DP-SGD."""
    out = {"clients": clients_section(r.clients), "simulation": (r.sim.state_dict, r.sim.load_state_dict)}
    if r.engine is not None:
        out["asynchronous"] = (r.engine.state_dict, r.engine.load_state_dict)
    if r.dp_sgd is not None:
        out["dp_sgd"] = (r.dp_sgd.state_dict, r.dp_sgd.load_state_dict)
    return out


def evaluator(r: Run):
    """``do_eval(record)``: the released model's metrics, added to ``record`` (main process only)."""
    cfg, fm, enc, plan, server = r.cfg, r.fm, r.enc, r.plan, r.server

    per_client = cfg.eval.clients and bool(r.clients)  # a deployed server holds no client's data

    def do_eval(record: dict) -> None:
        set_state_(fm.params, server.released_state if plan is None else plan.global_model(server.released_state))
        record.update(evaluate(fm, enc, r.test_idx, r.clients, cfg.eval.batch_size, per_client=per_client,
                               min_client_test=cfg.eval.min_client_test_examples))
        if r.backdoor_rows is not None:
            record["backdoor_success_rate"] = backdoor_success(fm, enc, r.backdoor_rows, cfg.eval.batch_size)
        if plan is not None and per_client:  # each client's own model on its local test split
            record.update(evaluate_personalized(fm, enc, r.clients, plan, server.released_state, cfg.eval.batch_size))

    return do_eval


def stop_before(r: Run, rnd: int) -> str | None:
    """Why round ``rnd`` must not run (a privacy budget is spent), or None."""
    if not r.server.budget_allows_next_round():
        return f"privacy budget: round {rnd} would exceed epsilon={r.server.privacy.target_epsilon}"
    if r.dp_sgd is not None and r.dp_sgd.exhausted():
        return f"dp_sgd budget: no client can train again within epsilon={r.dp_sgd.target_epsilon}"
    return None


def run_rounds(r: Run, main: bool, kept, start_round: int, console):
    """The round loop, run by every worker; only the main process evaluates and writes.

    Returns ``(metrics_log, stop_reason, progress)``.
    """
    cfg, sim = r.cfg, r.sim
    step = sim.run_round if r.engine is None else r.engine.step
    do_eval = evaluator(r)
    ckpt = checkpoint.Checkpointer(r.out, cfg.checkpoint.every, cfg.checkpoint.keep)
    tracker = open_tracker(cfg, r.out, resumed=kept is not None, first_round=start_round) if main else None
    metrics_log = MetricsLog(r.out / "metrics.jsonl" if main else None, kept=kept or (), tracker=tracker)
    stop_reason, rounds = None, cfg.federation.rounds
    with RunProgress(cfg, console=console, enabled=cfg.progress and main) as progress:
        progress.header(cfg, len(r.ds.texts), len(r.test_idx), r.stats, r.trainable, r.total)
        if cfg.eval.every > 0 and kept is None:
            record = {"round": 0, "version": 0, **r.server.ledger.snapshot()}
            log_round(r, record, main, do_eval, metrics_log, progress)
        for rnd in range(start_round, rounds + 1):
            if (stop_reason := stop_before(r, rnd)) is not None:
                progress.print(f"  stopped before round {rnd}: {stop_reason}")
                break
            record = step(rnd, on_client=progress.client_done)
            if r.dp_sgd is not None:
                record.update(r.dp_sgd.round_record())  # dp_sgd_epsilon: the largest client epsilon so far
            last = rnd == rounds or stop_before(r, rnd + 1) is not None
            due = (cfg.eval.every > 0 and rnd % cfg.eval.every == 0) or last
            log_round(r, record, main, do_eval if due else None, metrics_log, progress)
            if main and ckpt.due(rnd):  # numbered global version + server, client, privacy and RNG state
                ckpt.save(rnd, r.server, len(metrics_log.records), {k: w for k, (w, _) in sections(r).items()})
    metrics_log.close()
    return metrics_log, stop_reason, progress


def log_round(r: Run, record: dict, main: bool, do_eval, metrics_log: MetricsLog, progress) -> None:
    """Evaluate (every worker waits), then log the round's record."""
    if do_eval is not None:
        with evaluation(r.sim.group, r.cfg.threads):
            if main:
                do_eval(record)
    record["wall_s"] = time.perf_counter() - r.t_start
    metrics_log.write(record)
    if main:
        progress.round_done(record)


def finish(r: Run, records: list[dict], stop_reason: str | None, progress) -> dict:
    """Write the final state, the plot and summary.json; returns the summary."""
    cfg, server, plan = r.cfg, r.server, r.plan
    final_state = server.released_state if plan is None else plan.global_model(server.released_state)  # + initial personal
    set_state_(r.fm.params, final_state)
    meta = state_metadata(cfg, r.num_labels, r.ds.label_names, server.version)
    if plan is not None:
        meta["personal_tensors_initial"] = json.dumps(list(plan.personal_keys))  # clients keep their own
    save_state(final_state, r.out / "final_state.safetensors", metadata=meta)
    save_adapter(r.fm, cfg.model, r.ds.label_names, r.out / ADAPTER_DIR)  # PEFT methods: a standard peft folder
    if plan is not None and (personal := plan.personal_states(r.clients)):
        save_state(personal, r.out / "personal_states.safetensors", metadata={"method": plan.method})
    plot_metrics(records, r.out / "metrics.png", cfg.model.task)
    summary = make_summary(cfg, records, server, r.sim, r.trainable, r.total, time.perf_counter() - r.t_start, r.out)
    summary.update(run_facts(r, records))
    summary["stop_reason"] = stop_reason
    write_json(r.out / "summary.json", summary)
    progress.summary(summary)
    return summary


def run_facts(r: Run, records: list[dict]) -> dict:
    """The parts of summary.json that depend on what the run used (device, workers, fleet, privacy ...)."""
    out = {"device": str(r.device), "workers": 1 if r.sim.group is None else r.sim.group.world}
    out["client_memory"] = memory_summary(r.fm.model, r.cfg.model.quantize, records, r.device)
    if r.plan is not None:
        out["personalization"] = personal_summary(r.plan, r.clients, records, r.cfg.model.task)
    if r.device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(r.device)
    if r.fleet.enabled:
        out["devices"] = r.fleet.summary(r.sim.steps_of)
    if r.fleet.enabled or r.engine is not None:
        out["virtual_s"] = r.sim.clock
    if r.engine is not None:
        out["asynchronous"] = r.engine.summary()
    if r.poisoned_rows:
        out["poisoned_rows"] = {str(c): k for c, k in r.poisoned_rows.items()}
    if r.root_client is not None:
        out["fltrust_root_examples"] = len(r.root_client.train_idx)
    if r.server.privacy is not None:
        out["privacy"] = r.server.privacy.summary()
    if r.dp_sgd is not None:
        out.setdefault("privacy", {})["dp_sgd"] = r.dp_sgd.summary()
    return out
