"""Everything a run needs, built once from its config: data, clients, model, client side, server, driver.

Read top to bottom, this is the set-up of one federated run (``fedfm run``
and the continual loop share it):

1. load the dataset, hold out a global test set (and FLTrust's root set),
   partition the rest across clients and give each a local train/test split;
   each client filters its own training rows (``data.quality``, counts only);
2. build the model once (frozen base + trainable state) and tokenize once;
   poison the malicious clients' rows when an attack asks for it;
3. the client side: one local trainer on that model, wrapped for local
   DP-SGD, HetLoRA ranks, batched clients and personalization, behind one
   :class:`~fedfm.client.client.ClientApp` with the run's codecs;
4. the server side: the algorithm's fold wrapped for robustness or
   client-level DP, in one :class:`~fedfm.server.server.Server`;
5. the driver that moves messages between them (:mod:`fedfm.drivers`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from fedfm.client.batched import BatchedTrainer
from fedfm.client.client import ClientApp, SimulatedAttack
from fedfm.client.data import Client
from fedfm.client.hetlora import HetRankTrainer
from fedfm.client.personal import PersonalTrainer
from fedfm.client.trainer import LocalTrainer, LossFilterTrainer
from fedfm.compression.wire import Wire
from fedfm.config import RunConfig, to_dict
from fedfm.data.encode import encode
from fedfm.data.partition import cap_test_rows, partition, split_client, train_test_split
from fedfm.data.quality import QualityReport, clean_rows, quality_table
from fedfm.data.sources import load_text_dataset
from fedfm.data.stats import partition_stats
from fedfm.drivers.asynchronous import AsyncEngine
from fedfm.drivers.devices import Fleet, smaller_rank, training_footprint_mb
from fedfm.drivers.simulation import Simulation
from fedfm.drivers.workers import is_main_process, threads_before_start
from fedfm.errors import FedfmError
from fedfm.eval.report import write_json
from fedfm.models import build_model, resolve_device
from fedfm.models.state import get_state
from fedfm.personalization import build_plan
from fedfm.registry import (ATTACKS, NEEDS_GROUPS, NEEDS_ROOT_DATA, PARTITIONERS, POISONS_DATA, ROBUST_RULES,
                            TRIGGERS)
from fedfm.robustness.attacks import Attack
from fedfm.robustness.poison import check_poisoning, prepare_poisoning
from fedfm.server.compose import build_dp_sgd, build_server


def run_dir_for(cfg: RunConfig) -> Path:
    """``out=``, or ``runs/NAME-STAMP`` (:func:`fedfm.run_folder.claim` makes it unique)."""
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
    if ROBUST_RULES.supports(cfg.robust.rule, NEEDS_ROOT_DATA):
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
    if cfg.eval.max_test_examples is not None:  # the clients' test splits together, largest trimmed first
        capped = cap_test_rows([c.test_idx for c in clients], cfg.eval.max_test_examples, cfg.seed)
        for c, test in zip(clients, capped):
            c.test_idx = test
    num_classes = None if ds.label_names is None else len(ds.label_names)
    stats = partition_stats([c.train_idx for c in clients], ds.labels, num_classes,
                            groups=client_groups(cfg, ds, pool, parts))
    return limit_test(cfg, test_idx), clients, stats


def client_groups(cfg: RunConfig, ds, pool: np.ndarray, parts: list[np.ndarray]) -> list[list[str]] | None:
    """A natural partition's group values (e.g. user ids) per client, for partition.json; else None."""
    if ds.groups is None or not PARTITIONERS.supports(cfg.federation.partition.scheme, NEEDS_GROUPS):
        return None
    return [sorted({ds.groups[i] for i in pool[part]}) for part in parts]


def limit_test(cfg: RunConfig, test_idx: np.ndarray) -> np.ndarray:
    """At most ``eval.max_test_examples`` of the global test set, drawn with the run seed."""
    if cfg.eval.max_test_examples is not None and len(test_idx) > cfg.eval.max_test_examples:
        rng = np.random.default_rng(cfg.seed)
        test_idx = np.sort(rng.choice(test_idx, cfg.eval.max_test_examples, replace=False))
    return test_idx


def start_run(cfg: RunConfig, data=None):
    """The common start of every run: ``(device, run folder, start time, dataset)``.

    Resolves the device (failing before anything is written when a GPU is
    absent), sets threads and seeds, loads the dataset (``data``: another
    DataConfig to load instead of ``cfg.data``, e.g. a deployed server's own
    test file), and only then writes config.yaml -- unless the folder has one
    already (a resumed run keeps its own). The caller owns the folder
    (:func:`fedfm.run_folder.claim`), which removes what a failed start wrote.
    """
    device = resolve_device(cfg.device)
    out = run_dir_for(cfg)
    threads = threads_before_start(cfg, device)  # 1 until workers are forked (fedfm.drivers.workers)
    if threads:
        torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    data = cfg.data if data is None else data
    time_column = cfg.continual.time_column if cfg.continual.enabled else None  # stages cut at time boundaries
    ds = load_text_dataset(data, cfg.model.task, seed=cfg.seed, time_column=time_column)
    if cfg.model.task == "seq_cls" and ds.labels is None:
        raise FedfmError(f"task seq_cls needs labels, but dataset {data.dataset!r} has none")
    if is_main_process() and not (out / "config.yaml").is_file():  # under torchrun only rank 0 writes
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return device, out, t_start, ds


@dataclass
class Run:
    """One run's built parts (see the module docstring)."""

    cfg: RunConfig
    device: torch.device
    out: Path
    t_start: float
    ds: object  # fedfm.data.sources.TextDataset
    num_labels: int | None
    test_idx: np.ndarray
    clients: list[Client]
    stats: dict
    fm: object  # fedfm.models.build.FedModel
    enc: object  # fedfm.data.encode.Encoded
    trainer: object  # the local trainer with its wrappers
    dp_sgd: object | None
    plan: object | None  # personalization.PersonalPlan
    fleet: Fleet
    server: object  # fedfm.server.server.Server
    app: ClientApp
    sim: Simulation
    engine: AsyncEngine | None
    root_client: Client | None
    backdoor_rows: object | None
    poisoned_rows: dict
    trainable: int
    total: int


def build_run(cfg: RunConfig) -> Run:
    """Build everything of a run of ``cfg`` (the run folder gets config.yaml)."""
    check_quality(cfg)
    device, out, t_start, ds = start_run(cfg)
    attack = Attack(**cfg.attack.model_dump(), seed=cfg.seed, server_lr=cfg.algorithm.server_lr)  # "none": no attackers
    num_labels = len(ds.label_names) if cfg.model.task == "seq_cls" else None
    eval_backdoor = cfg.eval.backdoor or attack.supports(TRIGGERS)
    check_poisoning(attack, cfg.model.task, num_labels, eval_backdoor)
    holdout = split_holdout(cfg, ds)
    test_idx, clients, stats = build_clients(cfg, ds, holdout)
    if cfg.data.quality.enabled:  # each client filters its own rows; partition.json gets the counts
        groups = {k: stats[k] for k in ("client_groups",) if k in stats}  # a client's groups stay its own
        stats = {**clean_clients(cfg, ds, clients), **groups}
    if is_main_process():
        write_json(out / "partition.json", stats)

    fm = build_model(cfg.model, num_labels, seed=cfg.seed, device=device)  # loads model.init_state when set
    enc = encode(ds.texts, fm.tokenizer, cfg.model.max_length, ds.labels if cfg.model.task == "seq_cls" else None)
    backdoor_rows, poisoned_rows = None, {}
    if attack.poisons_data or eval_backdoor:  # poisoned / triggered rows, tokenized once, appended to enc
        poisoned = prepare_poisoning(attack, clients, attack.malicious(len(clients)), ds.texts, enc, fm.tokenizer,
                                     cfg.model.max_length, num_labels, test_idx, eval_backdoor)
        enc, backdoor_rows, poisoned_rows = poisoned.enc, poisoned.backdoor_rows, poisoned.poisoned_rows

    trainable = sum(p.numel() for p in fm.params.values())
    total = sum(p.numel() for p in fm.model.parameters())
    fleet = Fleet(cfg.devices, len(clients), cfg.seed, footprint_mb=training_footprint_mb(fm.model, trainable))
    dp_sgd = build_dp_sgd(cfg, fm, enc, clients)  # local sample-level DP-SGD (privacy.dp_sgd) or None
    trainer, plan, rank_of = client_trainer(cfg, fm, enc, dp_sgd, fleet)
    initial_state = get_state(fm.params) if plan is None else plan.shared(get_state(fm.params))  # what travels
    root = holdout[2]  # FLTrust: the server trains on its root data as a pseudo-client
    root_client = Client(cid=len(clients), train_idx=root, test_idx=root[:0]) if len(root) else None
    wire = Wire(cfg.compression, cfg.seed)
    server = build_server(cfg, len(clients), initial_state, wire=wire, rank_of=rank_of, trainer=trainer,
                          root_client=root_client, clients=clients)  # clients: their partition caps num_examples
    simulated = SimulatedAttack(attack, len(clients), cfg.seed) if attack.active else None
    app = ClientApp(trainer, server.algorithm, wire, attack=simulated)
    sim = Simulation(server, app, clients, cfg.federation.clients_per_round, cfg.seed, fleet=fleet,
                     secure_dropout=cfg.privacy.secure_aggregation.dropout)
    engine = AsyncEngine(sim, cfg.asynchronous) if cfg.asynchronous.enabled else None
    return Run(cfg, device, out, t_start, ds, num_labels, test_idx, clients, stats, fm, enc, trainer, dp_sgd, plan,
               fleet, server, app, sim, engine, root_client, backdoor_rows, poisoned_rows, trainable, total)


def client_trainer(cfg: RunConfig, fm, enc, dp_sgd, fleet: Fleet):
    """The local trainer with the wrappers the config asks for: ``(trainer, personal plan, rank_of)``."""
    trainer = LocalTrainer(fm, enc, cfg.train, seed=cfg.seed, dp_sgd=dp_sgd)
    full_rank = cfg.model.lora.r if any(p.lora_rank is not None for p in cfg.devices.profiles) else None
    rank_of = None
    if full_rank is not None:  # HetLoRA: each client trains and uploads only its own rank
        trainer = HetRankTrainer(trainer, fleet.rank, full_rank)
        rank_of = smaller_rank(fleet, full_rank)
    if cfg.train.batch_clients > 1:  # several clients per forward/backward (fedfm.client.batched)
        trainer = BatchedTrainer(trainer, cfg.train.batch_clients)
    plan = build_plan(cfg.personalization, fm)  # personal tensors that never leave the clients, or None
    if plan is not None:
        trainer = PersonalTrainer(trainer, plan)
    q = cfg.data.quality
    if q.enabled and q.loss_filter:  # each client leaves out its loss outliers under the broadcast model
        trainer = LossFilterTrainer(trainer, fm, enc, q, cfg.eval.batch_size)
    return trainer, plan, rank_of


def check_quality(cfg: RunConfig) -> None:
    """One-line errors for what ``data.quality`` and ``algorithm.weighting=quality`` cannot serve."""
    q = cfg.data.quality
    if cfg.algorithm.weighting == "quality" and not q.enabled:
        raise FedfmError("algorithm.weighting=quality needs data.quality.enabled=true "
                         "(the score is the fraction of its rows each client's filters keep)")
    if cfg.algorithm.weighting == "quality" and (cfg.robust.rule != "mean" or cfg.privacy.client_dp.enabled):
        why = f"robust.rule={cfg.robust.rule}" if cfg.robust.rule != "mean" else "privacy.client_dp"
        raise FedfmError(f"algorithm.weighting=quality cannot be combined with {why} (it weighs the updates itself)")
    if not q.enabled:
        return
    if cfg.continual.enabled:
        raise FedfmError("data.quality cannot be combined with continual learning yet (stages cut the rows)")
    if cfg.attack.name != "none" and ATTACKS.supports(cfg.attack.name, POISONS_DATA):
        raise FedfmError(f"data.quality cannot be combined with attack.name={cfg.attack.name} "
                         "(poisoned rows are added after the clients filter theirs)")
    if q.loss_filter:
        problems = {
            "privacy.dp_sgd (a data-dependent choice of rows each round is outside its accountant)":
                cfg.privacy.dp_sgd.enabled,
            "personalization (the broadcast holds only the shared tensors)": cfg.personalization.method != "none",
            f"train.batch_clients={cfg.train.batch_clients}": cfg.train.batch_clients > 1,
        }
        for what, bad in problems.items():
            if bad:
                raise FedfmError(f"data.quality.loss_filter cannot be combined with {what}")


def clean_client(cfg: RunConfig, ds, client: Client) -> QualityReport:
    """Run the static ``data.quality`` filters on ``client``'s training rows, in place; its counts.

    The client keeps the rows that pass (``train_idx``) and the counts
    (``quality``), which are all it reports. Used by simulations and by a deployed node on its own rows.
    """
    rows = client.train_idx
    labels = ds.labels[rows] if cfg.model.task == "seq_cls" and ds.labels is not None else None
    kept, report = clean_rows([ds.texts[i] for i in rows], labels, cfg.data.quality,
                              label_names=ds.label_names, seed=cfg.seed)
    client.train_idx, client.quality = rows[kept], report
    return report


def clean_clients(cfg: RunConfig, ds, clients: list[Client]) -> dict:
    """:func:`clean_client` on every client; the partition stats of the kept rows plus the data-quality table."""
    reports = {c.cid: clean_client(cfg, ds, c).to_dict() for c in clients}
    num_classes = None if ds.label_names is None else len(ds.label_names)
    stats = partition_stats([c.train_idx for c in clients], ds.labels, num_classes)
    stats["data_quality"] = quality_table(reports)
    return stats

