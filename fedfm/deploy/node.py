"""A node's resident worker: the client side of a deployed run, kept in memory between rounds.

``fedfm deploy node`` runs one :class:`NodeWorker` per device next to Flower's
SuperNode. It answers the requests the per-message ClientApp forwards
(:mod:`fedfm.deploy.link`):

* ``hello`` — the node's name and how many rows its local data file holds
  (counts only: no row, label or statistic leaves the node);
* ``train`` — one round: decode the server's broadcast, train on the node's
  own data, encode the update (:class:`fedfm.client.client.ClientApp`, the
  same code a simulation runs); under secure aggregation, mask it instead;
* ``secagg`` — a stage of the secure-aggregation protocol (keys, shares,
  unmask; :mod:`fedfm.privacy.secagg`), the client kept here between stages.

The first ``train`` of a run builds the client side from the run's config
(sent by the server with every message): the model (frozen base + trainable
state), the node's data read from *its own* file with the run's columns and
the label names the server announces (so label ids agree across nodes), the
local train/test split a simulated client with the same id would get, the
local trainer and the codecs. It stays built while the config is the same,
so the foundation model loads once per run, not once per message. The
client's private state (error-feedback residuals, SCAFFOLD's control
variate) is kept in memory and written to the node's state folder after
every round, so a node restarted mid-run picks it up again.

In a continual run every ``train`` names the stage: the node trains on its
own rows of that stage, with its replay buffer and the regularizer's anchor
(sent with its first train message of a stage), all kept in the client's
private state too (:class:`fedfm.deploy.continual.NodeStream`).
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfm.deploy.messages import MessageError
from fedfm.deploy.messages import header_int as _int
from fedfm.errors import FedfmError

log = logging.getLogger("fedfm")
STATE_FILE = "client_state.safetensors"


@dataclass
class NodeSession:
    """The client side of one run on this node."""

    key: str  # sha256 of the run's config text and the client id the server gave this node
    cfg: object  # the run's RunConfig
    app: object  # fedfm.client.client.ClientApp
    client: object  # fedfm.client.data.Client
    fold: object  # the run's server fold, as composed on the server: the shape of a secure summand
    stream: object = None  # a continual run: fedfm.deploy.continual.NodeStream (its stages, buffer, anchor)


class NodeMasking:
    """What :meth:`fedfm.client.client.ClientApp.fit` masks through under secure aggregation, on a node.

    ``submit`` turns the checked update into its summand vector and masks it
    with the round's shares; ``withheld`` keeps the reason the client kept it back.
    """

    def __init__(self, client, shares: dict, layout) -> None:
        self.client, self.shares, self.layout = client, shares, layout
        self.masked: dict | None = None
        self.clipped = 0
        self.reason: str | None = None

    def submit(self, update) -> None:
        vector, self.clipped = self.layout.vector(update)
        self.masked = self.client.masked_input(self.shares, vector)

    def withheld(self, cid: int, reason: str) -> None:
        self.reason = reason


class NodeWorker:
    """Answers one node's ``hello`` and ``train`` requests (see the module docstring)."""

    def __init__(self, data_path: str | Path, name: str, state_dir: str | Path, threads: int | None = None) -> None:
        self.data_path = Path(data_path)
        self.name = name
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self.session: NodeSession | None = None
        self.secagg_client = None  # (round, client id, SecAggClient) of the secure round in progress
        self._data: tuple[str, object] | None = None  # (the run's data settings, this node's rows as read)

    def handle(self, header: dict, payload: bytes | None, extra: bytes | None = None) -> tuple[dict, bytes | None]:
        """One request -> one reply; every failure is a reply with an ``error`` line, never a crash."""
        try:
            kind = header.get("kind")
            if kind == "hello":
                return self.hello(header), None
            if kind == "train":
                return self.train(header, payload, extra)
            if kind == "secagg":
                return self.secagg(header, payload)
            return {"error": f"unknown request kind {kind!r}"}, None
        except (FedfmError, MessageError) as err:
            log.error("node %s: %s", self.name, err)
            return {"error": str(err)}, None
        except Exception as err:  # noqa: BLE001 - report it to the server, keep serving
            log.error("node %s: %s", self.name, traceback.format_exc())
            return {"error": f"{type(err).__name__}: {err}".splitlines()[0]}, None

    def hello(self, header: dict) -> dict:
        return {"name": self.name, "rows": len(self._read(_config(header)).texts)}

    def _read(self, cfg):
        """This node's rows read with the run's columns (read once per data settings)."""
        key = cfg.data.model_dump_json() + cfg.model.task + str(_keeps_groups(cfg))
        if self._data is None or self._data[0] != key:
            self._data = (key, _local_dataset(cfg, self.data_path))
        return self._data[1]

    def train(self, header: dict, payload: bytes | None, extra: bytes | None = None) -> tuple[dict, bytes | None]:
        if payload is None:
            raise FedfmError("a train request without the server's broadcast")
        round_idx, cid = _int(header, "round"), _int(header, "cid")
        session = self._session(header, cid)
        if session.stream is not None:  # the header's stage: this node's rows of it (and a new anchor, if sent)
            session.stream.enter(header, extra if "anchor" in header else None)
        secure = self._masking(session, cid, round_idx, payload, extra) if header.get("secure") else None
        reply = session.app.fit(session.client, payload, round_idx, secure=secure)
        self._save_state(session)
        facts = {"cid": cid, "loss": reply.loss, "examples": reply.examples, "steps": reply.steps,
                 "memory_mb": reply.memory_mb}
        if reply.masked:  # only the masked summand leaves the node
            from fedfm.privacy.secagg_wire import pack

            return {**facts, "masked": True, "clipped": secure.clipped}, pack(secure.masked)
        if reply.withheld:
            return {"cid": cid, "withheld": secure.reason}, None
        if reply.sat_out:
            return {"sat_out": True, "cid": cid}, None
        return facts, reply.payload

    # -- secure aggregation (fedfm.privacy.secagg): this node's client of the round's protocol ----------
    def secagg(self, header: dict, payload: bytes | None) -> tuple[dict, bytes]:
        """One protocol stage: ``keys`` (a new round's set-up), ``shares`` or ``unmask``."""
        from fedfm.privacy.secagg import SecAggClient
        from fedfm.privacy.secagg_wire import pack, unpack

        stage, cid, round_idx = header.get("stage"), _int(header, "cid"), _int(header, "round")
        if payload is None:
            raise FedfmError(f"secure aggregation stage {stage!r} without its message")
        msg = unpack(payload)
        if stage == "keys":
            self.secagg_client = (round_idx, cid, SecAggClient(cid, msg))
            return {"cid": cid}, pack(self.secagg_client[2].advertise_keys())
        client = self._secagg_client(cid, round_idx)
        if stage == "shares":
            return {"cid": cid}, pack(client.share_keys(msg))
        if stage == "unmask":
            self.secagg_client = None  # one round only
            return {"cid": cid}, pack(client.unmask(msg))
        raise FedfmError(f"unknown secure aggregation stage {stage!r}")

    def _secagg_client(self, cid: int, round_idx: int):
        held = self.secagg_client
        if held is None or held[:2] != (round_idx, cid):
            raise FedfmError(f"no secure aggregation session of client {cid} in round {round_idx} on this node")
        return held[2]

    def _masking(self, session: NodeSession, cid: int, round_idx: int, payload: bytes, extra: bytes | None):
        from fedfm.privacy.secagg_wire import unpack
        from fedfm.server.secure import SummandLayout

        if extra is None:
            raise FedfmError("a secure round's train request without this client's shares")
        cfg = session.cfg.privacy.secure_aggregation
        broadcast = session.app.wire.decode_broadcast(payload)
        session.fold.start(broadcast.state, broadcast.version)  # the summand is taken against the round's state
        layout = SummandLayout(session.fold, broadcast.state, cfg.clip_range, cfg.max_weight)
        return NodeMasking(self._secagg_client(cid, round_idx), unpack(extra), layout)

    # -- the client side of a run -----------------------------------------------------
    def _session(self, header: dict, cid: int) -> NodeSession:
        text = header.get("config")
        key = hashlib.sha256(f"{text}\0{cid}\0{header.get('labels')}".encode()).hexdigest()
        if self.session is None or self.session.key != key:
            self.session = None  # free the previous run's model first
            self.session = self._build(_config(header), cid, header.get("labels"), key)
        return self.session

    def _build(self, cfg, cid: int, labels, key: str) -> NodeSession:
        import torch

        from fedfm.build import clean_client, client_trainer, seed_everything
        from fedfm.client.client import ClientApp
        from fedfm.client.data import Client
        from fedfm.compression.wire import Wire
        from fedfm.config.schema import DevicesConfig
        from fedfm.data.encode import encode
        from fedfm.data.partition import split_client
        from fedfm.drivers.devices import Fleet
        from fedfm.models import build_model, resolve_device
        from fedfm.server.compose import build_algorithm_fold

        if self.threads:
            torch.set_num_threads(self.threads)
        elif cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        ds = self._read(cfg)
        if cfg.model.task == "seq_cls":
            ds = _with_labels(ds, labels, self.data_path)
        num_labels = len(labels) if cfg.model.task == "seq_cls" else None
        fm = build_model(cfg.model, num_labels, seed=cfg.seed, device=device)
        enc = encode(ds.texts, fm.tokenizer, cfg.model.max_length, ds.labels if cfg.model.task == "seq_cls" else None)
        fleet = Fleet(DevicesConfig(), 1, cfg.seed, footprint_mb=0.0)  # a real device: no simulated profile
        trainer, _, _ = client_trainer(cfg, fm, enc, None, fleet)
        algorithm, _ = build_algorithm_fold(cfg, cfg.federation.num_clients)  # client hooks; the fold's summand
        train, test = split_client(np.arange(len(ds.texts)), cfg.data.client_test_fraction,
                                   seed=cfg.seed * 1_000_003 + cid)  # the split a simulated client cid gets
        client = Client(cid=cid, train_idx=train, test_idx=test)
        if cfg.data.quality.enabled:  # the node filters its own rows; it reports only the counts
            clean_client(cfg, ds, client)
        session = NodeSession(key, cfg, ClientApp(trainer, algorithm, Wire(cfg.compression, cfg.seed)), client,
                              algorithm.fold)
        if cfg.continual.enabled:
            self._stream(session, train, ds, fm, enc)
        self._load_state(session)
        log.info("node %s: built client %d of run %s (%d train / %d test rows)", self.name, cid, cfg.name,
                 len(train), len(test))
        return session

    @staticmethod
    def _stream(session: NodeSession, shard, ds, fm, enc) -> None:
        """A continual run: the client's stages on this node, as the simulation's loop wraps its client side."""
        from fedfm.deploy.continual import NodeStream
        from fedfm.drivers.continual import StageTrainer, client_algorithm

        session.stream = NodeStream(session.cfg, session.client, shard, ds, fm, enc)
        app = session.app
        app.trainer = StageTrainer(app.trainer, None, None)  # no rows in a stage: it sits the round out
        app.algorithm = client_algorithm(app.algorithm, session.stream.regularizer)

    def _load_state(self, session: NodeSession) -> None:
        from fedfm.client.state import blob_metadata, unpack_client_states

        path = self.state_dir / STATE_FILE
        if not path.is_file():
            return
        blob = path.read_bytes()
        if blob_metadata(blob).get("session") == session.key:  # not another run's (or client id's) state
            unpack_client_states([session.client], blob)

    def _save_state(self, session: NodeSession) -> None:
        from fedfm.client.state import pack_client_states

        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_bytes(pack_client_states([session.client], metadata={"session": session.key}))
        tmp.replace(self.state_dir / STATE_FILE)  # atomic: a kill never leaves half a state


def _config(header: dict):
    from fedfm.config.load import config_from_text

    text = header.get("config")
    if not isinstance(text, str):
        raise FedfmError("the run carries no fedfm config (run config key 'fedfm-config')")
    return config_from_text(text)


def _local_dataset(cfg, path: Path):
    """This node's rows, read with the run's columns (label ids in its own sorted order)."""
    from fedfm.data.sources import load_text_dataset

    group = cfg.data.group_column if _keeps_groups(cfg) else None
    data = cfg.data.model_copy(update={"dataset": str(path), "group_column": group, "max_examples": None})
    return load_text_dataset(data, cfg.model.task, seed=cfg.seed, min_classes=1)  # a shard may hold one class


def _keeps_groups(cfg) -> bool:
    """A continual stream of tasks over unlabelled rows names groups (a play of ``play:role``): read that column."""
    return cfg.continual.enabled and cfg.continual.stream == "tasks" and cfg.model.task != "seq_cls"


def _with_labels(ds, labels, path: Path):
    """``ds`` with label ids that follow the server's ``labels`` (so every node encodes them alike)."""
    from dataclasses import replace

    if labels is None:
        return ds
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise FedfmError("the server's label names must be a list of strings")
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted(set(ds.label_names) - set(index))
    if unknown:
        raise FedfmError(f"{path} has labels the run does not know: {unknown[:5]} (the run's: {labels})")
    remap = np.array([index[name] for name in ds.label_names], dtype=np.int64)
    return replace(ds, labels=remap[ds.labels], label_names=list(labels))
