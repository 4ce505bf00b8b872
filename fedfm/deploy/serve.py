"""The server side of a deployed run: built from the submitted config, looped like ``fedfm run``.

The ServerApp (:mod:`fedfm.deploy.server_app`) calls :func:`serve` with
Flower's Grid. It builds what the server needs and nothing of the clients
(their data stays on the nodes): the model (for the initial state and
evaluation), the server's test data, the :class:`~fedfm.server.server.Server`
with the run's algorithm, robust rule, client-level DP and codecs, and the
:class:`~fedfm.deploy.driver.Deployment` driver (synchronous rounds) or, with
``asynchronous.enabled``, :class:`~fedfm.deploy.asynchronous.AsyncDeployment` on top of it. Then it runs the same loop,
checkpoints and run folder as a simulation (:mod:`fedfm.runner`): config.yaml,
metrics.jsonl, summary.json, final_state.safetensors, metrics.png,
checkpoints/ — and ``resume`` continues from the latest checkpoint. The server
owns the run folder while it serves (:func:`fedfm.run_folder.claim`).
With ``continual.enabled`` the loop is the simulation's always-on stage loop
(:class:`~fedfm.drivers.continual.ContinualLoop`), its clients' side
over the network (:class:`~fedfm.deploy.continual.NodeStages`).
"""

from __future__ import annotations

import numpy as np

from fedfm import run_folder
from fedfm.build import Run, build_clients, check_quality, limit_test, start_run
from fedfm.client.batched import check_batching
from fedfm.compression import check_compression
from fedfm.compression.wire import Wire
from fedfm.config import RunConfig, to_dict
from fedfm.config.schema import DevicesConfig
from fedfm.data.encode import encode
from fedfm.deploy.asynchronous import AsyncDeployment
from fedfm.deploy.continual import NodeStages
from fedfm.deploy.driver import Deployment
from fedfm.drivers.continual import ContinualLoop
from fedfm.drivers.continual import check_supported as check_continual
from fedfm.drivers.devices import Fleet
from fedfm.errors import FedfmError
from fedfm.eval.report import write_json
from fedfm.models import build_model
from fedfm.models.state import get_state
from fedfm.personalization import build_plan, check_personalization
from fedfm.runner import finish, restore, run_rounds
from fedfm.server import checkpoint
from fedfm.server.compose import build_server

# What a deployment cannot run yet, as (is it asked for, why): one line each, before anything is built.
UNSUPPORTED = (
    (lambda c: c.attack.name != "none", "attack.name: attacks are simulated only (use `fedfm run`)"),
    (lambda c: bool(c.devices.profiles), "devices.profiles: simulated device profiles; real nodes are real devices"),
    (lambda c: c.privacy.dp_sgd.enabled, "privacy.dp_sgd: not deployed yet"),
    (lambda c: c.privacy.secure_aggregation.dropout > 0,
     "privacy.secure_aggregation.dropout: simulated drop-outs; real nodes drop out by themselves"),
    (lambda c: c.continual.enabled and c.asynchronous.enabled,
     "continual with asynchronous training: not combined yet (nor in a simulation)"),
    (lambda c: c.continual.enabled and c.continual.regularizer.name != "none" and c.privacy.secure_aggregation.enabled,
     "continual.regularizer with privacy.secure_aggregation: not deployed yet "
     "(both ride a train message's second payload)"),
    (lambda c: c.robust.rule == "fltrust", "robust.rule=fltrust: not deployed yet (needs the server's root data)"),
    (lambda c: c.continual.enabled and c.continual.time_column is not None,
     "continual.time_column: simulated only yet (the nodes would need the server's time boundaries)"),
    (lambda c: c.train.batch_clients > 1, "train.batch_clients: a node trains one client"),
)


def check_deployable(cfg: RunConfig) -> None:
    """One-line error for the first part of ``cfg`` a deployment cannot run (or a simulation would refuse)."""
    check_personalization(cfg)
    check_compression(cfg)
    check_batching(cfg)
    check_quality(cfg)  # data.quality: what a simulation refuses (the nodes filter their own rows)
    if cfg.continual.enabled:
        check_continual(cfg)  # what the stage loop refuses in a simulation, it refuses deployed
    for asked, why in UNSUPPORTED:
        if asked(cfg):
            raise FedfmError(f"cannot deploy this config: {why}")
    if cfg.out is None:
        raise FedfmError("a deployed run needs out= (the run folder on the server machine)")


def serve(grid, cfg: RunConfig, resume: bool = False, console=None) -> dict:
    """Run ``cfg`` over the nodes of ``grid``; returns the summary (also in RUN_DIR/summary.json)."""
    check_deployable(cfg)
    if resume:
        cfg = checkpoint.resume_config(cfg.out, to_dict(cfg))
    with run_folder.claim(cfg.out, resume=resume) as folder, run_folder.io_errors():  # held to the end
        r = build_server_run(cfg, grid)
        folder.started()
        return serve_built(r, resume, console)


def serve_built(r: Run, resume: bool, console) -> dict:
    """Restore (``resume``), wait for the nodes, loop and finish a built server run; the summary."""
    if r.cfg.continual.enabled:  # the simulation's always-on stage loop; the nodes reveal their own rows
        loop = ContinualLoop(r, NodeStages)
        kept = loop.restore(r.out if resume else None)
        join_nodes(r)
        loop.run(kept, console)
        return loop.finish()
    kept, start_round = restore(r, r.out if resume else None)
    join_nodes(r)
    metrics_log, stop_reason, progress = run_rounds(r, True, kept, start_round, console)
    return finish(r, metrics_log.records, stop_reason, progress)


def join_nodes(r: Run) -> None:
    """Wait for ``deploy.min_nodes`` nodes; write partition.json (each node's name, client id and row count)."""
    cfg = r.cfg
    r.sim.join(cfg.deploy.min_nodes or cfg.federation.clients_per_round, cfg.deploy.join_timeout_s)
    sizes = np.array([r.sim.rows[c] for c in r.sim.live()], dtype=np.float64)
    r.stats = {"size_min": int(sizes.min()), "size_max": int(sizes.max()), "size_mean": float(sizes.mean())}
    nodes = {name: {"client": cid, "rows": r.sim.rows.get(cid)} for name, cid in r.sim.cid_of_name.items()}
    write_json(r.out / "partition.json", {**r.stats, "nodes": nodes})  # counts only: the rows stay on the nodes


def build_server_run(cfg: RunConfig, grid) -> Run:
    """The server's part of a run (see the module docstring); ``clients`` is empty: they are the nodes."""
    test_data = cfg.deploy.test_data
    data = None if test_data is None else cfg.data.model_copy(update={"dataset": test_data, "group_column": None})
    device, out, t_start, ds = start_run(cfg, data)
    if test_data is None:  # the global held-out split, as a simulation of the same config has it
        test_idx, _, _ = build_clients(cfg, ds)
    else:
        test_idx = limit_test(cfg, np.arange(len(ds.texts), dtype=np.int64))
    num_labels = len(ds.label_names) if cfg.model.task == "seq_cls" else None
    fm = build_model(cfg.model, num_labels, seed=cfg.seed, device=device)
    enc = encode(ds.texts, fm.tokenizer, cfg.model.max_length, ds.labels if cfg.model.task == "seq_cls" else None)
    plan = build_plan(cfg.personalization, fm)  # personal tensors stay on the nodes: only the shared part travels
    initial = get_state(fm.params) if plan is None else plan.shared(get_state(fm.params))
    server = build_server(cfg, cfg.federation.num_clients, initial, wire=Wire(cfg.compression, cfg.seed))
    driver = Deployment(server, grid, cfg, ds.label_names if cfg.model.task == "seq_cls" else None)
    engine = AsyncDeployment(driver, cfg.asynchronous) if cfg.asynchronous.enabled else None  # FedBuff / FedAsync
    trainable = sum(p.numel() for p in fm.params.values())
    total = sum(p.numel() for p in fm.model.parameters())
    return Run(cfg=cfg, device=device, out=out, t_start=t_start, ds=ds, num_labels=num_labels, test_idx=test_idx,
               clients=[], stats={}, fm=fm, enc=enc, trainer=None, dp_sgd=None, plan=plan,
               fleet=Fleet(DevicesConfig(), 1, cfg.seed), server=server, app=None, sim=driver, engine=engine,
               root_client=None, backdoor_rows=None, poisoned_rows={}, trainable=trainable, total=total)
