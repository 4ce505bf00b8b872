"""Continual learning deployed: the always-on stage loop with Flower nodes as its clients.

The server runs the simulation's loop unchanged (:class:`fedfm.drivers.continual.ContinualLoop`:
the stage plan, numbered global versions across stages, scoring every seen task
on the server's test rows, forgetting metrics, per-task states, checkpoints,
resume mid-stage). Only the clients' side of the stages goes over the network
(:class:`~fedfm.drivers.continual.StageClients`):

* :class:`NodeStages` (server) — every train message's header names the stage,
  the stage at which that node joined and the plan's rule for cutting rows into
  stages (the task names of every stage, or the number of windows); with a
  regularizer, the previous stage's global model (the *anchor*) rides with a
  node's first train message of a stage as the message's second payload,
  charged to the byte ledger (:meth:`~fedfm.server.server.Server.charge`) as the
  simulation charges it;
* :class:`NodeStream` (node) — the node cuts its *own* rows with that rule
  (:func:`fedfm.continual.stream.client_stages`; raw data never leaves it),
  advances stage by stage from where it was (its replay buffer offered each
  stage's new rows, :func:`fedfm.continual.replay.reveal`; with EWC its Fisher
  added at the anchor for the stage that ended) and trains on the stage's rows.
  Its stage, rows, buffer, anchor and Fisher live in the client's private
  state, which the node writes to its state file after every round, so a
  restarted node continues.

A node that joins late starts its stream at the stage it joined in (its
earlier rows arrived before it took part), gets the newest global version and
the anchor with its first train message and trains on that stage's rows.

Where the deployment differs from the simulation (documented, not hidden):
the anchor is sent (and charged) with a node's first train message of a stage
even when the node has no rows in it, and again after the node failed, died
or missed a round (a node that lost its state file fails one round for lack
of the anchor, then gets it); with EWC, a node that was not sampled
in a whole stage estimates that stage's Fisher at the next anchor it receives
(the simulation: at that stage's own final model).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from fedfm.continual.regularizers import FISHER_KEY
from fedfm.continual.replay import client_buffer, reveal
from fedfm.continual.stream import StreamPlan, client_stages
from fedfm.deploy.messages import header_int as _int
from fedfm.drivers.continual import build_regularizer
from fedfm.errors import FedfmError
from fedfm.models.state import state_from_bytes, set_state_, state_to_bytes
from fedfm.server.server import clone
from fedfm.tensor_groups import get_group, put_group

log = logging.getLogger("fedfm")
# the node's side of the stages, in the client's private state (written to the node's state file)
STAGE, ROWS, BUFFER, ANCHOR, ANCHOR_STAGE = (
    "continual_stage", "continual_rows", "continual_buffer", "continual_anchor", "continual_anchor_stage")


class NodeStages:
    """The server's end of the nodes' stages (a :class:`~fedfm.drivers.continual.StageClients`; module docstring)."""

    def __init__(self, r, plan: StreamPlan) -> None:
        self.driver, self.server = r.sim, r.server
        self.driver.stages = self  # its train messages ask train_fields; its admissions call admitted
        self.rule = plan.rule
        self.regularized = r.cfg.continual.regularizer.name != "none"
        self.stage = 0
        self.anchor = None  # the previous stage's final global model (with a regularizer)
        self._anchor_bytes: bytes | None = None
        self.anchor_sent: dict[int, int] = {}  # client id -> the stage whose anchor its node holds
        self.joined: dict[int, int] = {}  # client id -> the stage its node joined in

    def begin_stage(self, k: int) -> None:
        """Nothing to do here: a node reveals its own rows when a train message names stage ``k``."""

    def enter_stage(self, k: int) -> None:
        self.stage = k

    def end_stage(self, k: int, global_state) -> None:
        if self.regularized:
            self.anchor, self._anchor_bytes = clone(global_state), None

    def new_task(self) -> None:
        """Nodes keep their own algorithm; the server's broadcast carries the new task's state."""

    def admitted(self, cid: int) -> None:
        """A node joined as ``cid`` (a restarted one keeps its stream and anchor in its state file)."""
        self.joined.setdefault(cid, self.stage)

    def unsure(self, cid: int) -> None:
        """``cid``'s node may not hold the anchor (it failed, e.g. for lack of it, died or was late): resend it."""
        self.anchor_sent.pop(cid, None)

    def train_fields(self, cid: int) -> tuple[dict, bytes | None]:
        """What ``cid``'s train message adds to its header, and the anchor when its node lacks it (charged)."""
        fields = {"stage": self.stage, "first_stage": self.joined.get(cid, self.stage), "stream": self.rule}
        if self.anchor is None or self.anchor_sent.get(cid) == self.stage:
            return fields, None
        if self._anchor_bytes is None:
            self._anchor_bytes = state_to_bytes(self.anchor)
        self.anchor_sent[cid] = self.stage
        self.server.charge(cid, "down", len(self._anchor_bytes))
        return {**fields, "anchor": self.stage}, self._anchor_bytes

    def write(self, tensors: dict, orders: dict) -> dict:
        if self.anchor is not None:
            put_group(tensors, orders, "continual/anchor", self.anchor)
        return {"nodes": {"joined": self.joined, "anchor_sent": self.anchor_sent}}

    def load(self, meta: dict, tensors, orders: dict) -> None:
        if self.regularized and "continual/anchor" in orders:
            self.anchor = get_group(tensors, orders, "continual/anchor")
        nodes = meta.get("nodes", {})
        self.joined = {int(c): int(s) for c, s in nodes.get("joined", {}).items()}
        self.anchor_sent = {int(c): int(s) for c, s in nodes.get("anchor_sent", {}).items()}


class NodeStream:
    """A node's end of the stages: its rows, replay buffer, anchor and Fisher (module docstring).

    ``shard``: the node's own training rows (as a simulated client's shard);
    ``fm``/``enc``: the node's model and encoded rows (EWC estimates its Fisher on them).
    """

    def __init__(self, cfg, client, shard: np.ndarray, ds, fm, enc) -> None:
        self.cfg, self.client, self.shard, self.ds, self.fm, self.enc = cfg, client, shard, ds, fm, enc
        self.regularizer = build_regularizer(cfg)
        self._cut: tuple[str, list[np.ndarray]] | None = None  # (rule as JSON, rows per stage)

    def enter(self, header: dict, anchor: bytes | None) -> None:
        """Put the client on the header's stage: advance stage by stage from its last, store a new anchor."""
        k, first = _int(header, "stage"), _int(header, "first_stage")
        stages = self._stages(header.get("stream"))
        if k >= len(stages) or first > k:
            raise FedfmError(f"stage {k} (joined in {first}) is not in the run's {len(stages)} stages")
        st = self.client.state
        if anchor is not None:
            st[ANCHOR], st[ANCHOR_STAGE] = state_from_bytes(anchor), _int(header, "anchor")
        at = st.get(STAGE)
        if at is not None and at > k:  # the server resumed from before this node's stage: replay the stream
            log.warning("client %d is at stage %d, the server at stage %d: its stream restarts", self.client.cid, at, k)
            for key in (STAGE, ROWS, BUFFER, FISHER_KEY):
                st.pop(key, None)
            at = None
        for j in range(first if at is None else at + 1, k + 1):
            if STAGE in st:
                self._end(j - 1)
            self._begin(j, stages[j])
        self.client.train_idx = st[ROWS].numpy()
        if self.regularizer is not None:
            self.regularizer.anchor = self._anchor(k) if k > 0 else None

    def _stages(self, rule) -> list[np.ndarray]:
        """The node's rows of every stage, cut by the server's rule (cut once per rule)."""
        text = json.dumps(rule, sort_keys=True)
        if self._cut is None or self._cut[0] != text:
            self._cut = (text, client_stages(_checked_rule(rule), self.ds, self.shard))
        return self._cut[1]

    def _begin(self, j: int, new: np.ndarray) -> None:
        """Stage ``j`` reveals ``new``: the rows to train on (with the buffer), then the buffer takes them."""
        st = self.client.state
        buffer = client_buffer(self.cfg.continual.replay, self.cfg.seed, self.client.cid)
        if buffer is not None and BUFFER in st:
            buffer.load_state_dict(json.loads(st[BUFFER]))
        st[ROWS] = torch.from_numpy(np.asarray(reveal(new, buffer), dtype=np.int64))
        st[STAGE] = j
        if buffer is not None:
            st[BUFFER] = json.dumps(buffer.state_dict())

    def _end(self, j: int) -> None:
        """Stage ``j`` ended: with EWC, add its Fisher on the rows trained in it, at the anchor held."""
        reg = self.regularizer
        if reg is None or reg.kind != "ewc":
            return
        anchor = self._anchor(j + 1, exact=False)
        set_state_(self.fm.params, anchor)
        reg.end_stage(anchor, self.fm, self.enc, [self.client], [self.client.state[ROWS].numpy()], j)

    def _anchor(self, k: int, exact: bool = True):
        st = self.client.state
        held = st.get(ANCHOR_STAGE)
        if held is None or (held != k if exact else held < k):
            raise FedfmError(f"stage {k} needs the previous stage's global model (the regularizer's anchor), "
                             f"and this node holds {'none' if held is None else f'that of stage {held}'}")
        return st[ANCHOR]


def _checked_rule(rule) -> dict:
    """The server's stage rule: ``{"tasks": [[name, ...], ...]}`` or ``{"windows": n}``; one line when not."""
    if isinstance(rule, dict) and set(rule) == {"tasks"}:
        tasks = rule["tasks"]
        if isinstance(tasks, list) and tasks and all(
                isinstance(t, list) and all(isinstance(n, str) for n in t) for t in tasks):
            return rule
    if isinstance(rule, dict) and set(rule) == {"windows"}:
        n = rule["windows"]
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return rule
    raise FedfmError(f"request field 'stream' must be {{'tasks': [[names]]}} or {{'windows': n}}, got {rule!r}")
