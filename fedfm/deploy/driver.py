"""The deployment's driver: synchronous rounds of fedfm's Server over Flower nodes, through the Grid.

Like the simulation (:mod:`fedfm.drivers.simulation`) it only drives: it
samples a cohort, pushes each sampled node the server's broadcast, hands
every reply to :meth:`~fedfm.server.server.Server.receive` as it arrives and
closes the round. The server decodes, validates, aggregates and versions.

**Which node is which client.** A node joins by answering a ``hello`` query
with its name and row count. The first nodes get client ids in the order of
their names (so a run over nodes ``client-000 ... client-00N`` samples
exactly as a simulation of N clients does), later ones the next free id, up
to ``federation.num_clients``. A node restarted under the same name (Flower
gives it a new node id) gets its old client id back; the old node id gets no
more work. Replies are matched to
requests by Flower's message ids and must come from the node they were sent
to (Flower authenticates nodes when ``--enable-supernode-auth`` is on).

**Deadlines.** A round closes as soon as every sampled node replied, or at
``deploy.round_timeout_s``: late and dead nodes are dropped and counted
(``dropped``), node-side failures are counted (``failed``) with their reason
logged. With fewer than ``deploy.min_replies`` updates folded nothing is
released that round (``aborted``).

**Continual runs.** With ``stages`` set (:class:`fedfm.deploy.continual.NodeStages`)
every train message also names the stage, and carries the regularizer's
anchor to a node that lacks it; a node admitted is reported to it, and so is
one that failed, dropped out or was late (the anchor goes again with its next train message).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
from flwr.app import Message

from fedfm.deploy.messages import MessageError, pack, payload_size, unpack
from fedfm.drivers.simulation import RoundTally, reported_memory, sample_from
from fedfm.errors import FedfmError
from fedfm.privacy.secagg_wire import pack as secagg_pack
from fedfm.privacy.secagg_wire import unpack as secagg_unpack
from fedfm.server.server import Server

log = logging.getLogger("fedfm")
POLL_S = 0.2
MAX_NAME = 128


class Deployment:
    """Rounds of ``server`` over the nodes of ``grid`` (see the module docstring)."""

    def __init__(self, server: Server, grid, cfg, label_names: list[str] | None) -> None:
        self.server, self.grid, self.cfg = server, grid, cfg
        self.label_names = label_names
        self.clients_per_round = cfg.federation.clients_per_round
        self.seed = cfg.seed
        self.cid_of_name: dict[str, int] = {}
        self.node_of: dict[int, int] = {}  # client id -> its current Flower node id
        self.rows: dict[int, int] = {}  # client id -> rows its node reported
        self.refused: set[int] = set()  # node ids that answered hello unusably or found the federation full
        self.group = None  # one server process: no simulation workers
        self.malicious: set[int] = set()  # attacks are simulated only
        self.clock = 0.0
        self.wire = {"up": 0, "down": 0}  # fedfm payload bytes in the Flower messages of train rounds
        self.stages = None  # a continual run: fedfm.deploy.continual.NodeStages (the stage in every train message)
        server.example_cap = self.rows.get  # an update may not weigh more rows than its node said it holds
        if server.secure is not None:  # the secure-aggregation protocol's stages go over the network
            from fedfm.deploy.secure import FlowerSecAgg

            server.secure_transport = FlowerSecAgg(self)

    # -- nodes -----------------------------------------------------------------------
    def header(self, kind: str, **fields) -> dict:
        return {"kind": kind, "labels": self.label_names, **fields}

    def exchange(self, messages: dict[int, Message], timeout_s: float, on_reply: Callable) -> set[int]:
        """Push ``messages`` (key -> message), call ``on_reply(key, reply)`` as replies arrive; the keys left."""
        ids = {}
        for key, mid in zip(messages, self.grid.push_messages(list(messages.values()))):
            if mid:
                ids[mid] = key
        pending, deadline = set(ids), time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    on_reply(ids[mid], reply)
            if pending:
                time.sleep(POLL_S)
        return {ids[m] for m in pending}

    def register(self, timeout_s: float | None = None) -> None:
        """Greet nodes not seen before and give each a client id."""
        known = set(self.node_of.values()) | self.refused  # refused nodes are not asked again
        new = sorted(n for n in self.grid.get_node_ids() if n not in known)
        if not new:
            return
        hello = {n: self.message(self.header("hello"), None, n, "query", timeout_s) for n in new}
        answers: dict[int, tuple[str, int]] = {}

        def on_reply(node: int, reply: Message) -> None:
            problem, header, _ = self.reply_problem(reply, node)
            name, rows = header.get("name"), header.get("rows")
            if problem is None and not (isinstance(name, str) and 0 < len(name) <= MAX_NAME):
                problem = f"invalid node name {name!r}"
            if problem is None and not (isinstance(rows, int) and not isinstance(rows, bool) and rows > 0):
                problem = f"invalid row count {rows!r}"
            if problem is not None:
                self.refused.add(node)
                log.warning("node %d refused: %s", node, problem)
                return
            answers[node] = (name, rows)

        self.exchange(hello, timeout_s or self.cfg.deploy.round_timeout_s, on_reply)
        for node, (name, rows) in sorted(answers.items(), key=lambda kv: kv[1][0]):
            self._admit(node, name, rows)

    def _admit(self, node: int, name: str, rows: int) -> None:
        """Give ``node`` its name's client id (a restarted node replaces its old self), or the next free one."""
        cid = self.cid_of_name.get(name)
        if cid is not None and cid in self.node_of and self.node_of[cid] != node:
            log.warning("node %d (%s) takes over client %d from node %d", node, name, cid, self.node_of[cid])
        if cid is None:
            if len(self.cid_of_name) >= self.cfg.federation.num_clients:
                self.refused.add(node)
                log.warning("node %d (%s) refused: the federation is full (federation.num_clients=%d)",
                            node, name, self.cfg.federation.num_clients)
                return
            cid = self.cid_of_name[name] = len(self.cid_of_name)
        self.node_of[cid], self.rows[cid] = node, rows
        if self.stages is not None:
            self.stages.admitted(cid)
        log.info("node %s joined as client %d (%d rows)", name, cid, rows)

    def live(self) -> list[int]:
        """Client ids whose node is connected now."""
        online = set(self.grid.get_node_ids())
        return sorted(c for c, n in self.node_of.items() if n in online)

    def join(self, min_nodes: int, timeout_s: float) -> None:
        """Wait until ``min_nodes`` nodes joined; one-line error after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.register(timeout_s=max(1.0, min(60.0, deadline - time.monotonic())))
            if len(self.live()) >= min_nodes:
                return
            if time.monotonic() >= deadline:
                raise FedfmError(f"only {len(self.live())} of deploy.min_nodes={min_nodes} nodes joined "
                                 f"within deploy.join_timeout_s={timeout_s:g}s")
            time.sleep(1.0)

    def await_nodes(self, round_idx: int) -> None:
        """Before a later round: wait up to ``deploy.round_timeout_s`` for ``min_nodes`` connected nodes.

        As Flower's strategies wait for their minimum of available nodes every
        round: a node restarted after a crash has the time to come back before
        the next cohort is drawn. Short of them at the deadline, the round
        samples among the nodes connected (one line in the log).
        """
        want = self.cfg.deploy.min_nodes or self.clients_per_round
        deadline = time.monotonic() + self.cfg.deploy.round_timeout_s
        while len(self.live()) < want and time.monotonic() < deadline:
            time.sleep(1.0)
            self.register(timeout_s=max(1.0, min(30.0, deadline - time.monotonic())))
        if len(self.live()) < want:
            log.warning("round %d: %d of deploy.min_nodes=%d nodes connected after %gs; sampling among them",
                        round_idx, len(self.live()), want, self.cfg.deploy.round_timeout_s)

    # -- a round ---------------------------------------------------------------------
    def cohort(self, round_idx: int) -> list[int]:
        return sample_from(np.array(self.live(), dtype=np.int64), self.clients_per_round, self.seed, round_idx)

    def run_round(self, round_idx: int, on_client: Callable[[int], None] | None = None) -> dict:
        """One synchronous round; returns its record (without evaluation)."""
        t0 = time.perf_counter()
        self.register(timeout_s=min(30.0, self.cfg.deploy.round_timeout_s))
        self.await_nodes(round_idx)
        server, cohort = self.server, self.cohort(round_idx)
        server.open_round(round_idx, cohort)  # under secure aggregation: the key agreement, over the network
        tally, failed, dead = RoundTally(), [], []
        timeout = self.cfg.deploy.round_timeout_s
        session = server.session
        targets = cohort if session is None else ([] if server.aborted else session.expected)
        messages = {c: self.train_message(c, round_idx, timeout) for c in targets}
        self.wire["down"] += sum(payload_size(m) for m in messages.values())

        def on_reply(cid: int, reply: Message) -> None:
            outcome, header = self.deliver(cid, reply, f"round {round_idx}")
            if outcome in ("failed", "dropped"):
                (failed if outcome == "failed" else dead).append(cid)
                if self.stages is not None:
                    self.stages.unsure(cid)
            elif outcome == "folded":
                tally.accepted += 1
                tally.losses.append(float(header.get("loss", float("nan"))))
                tally.weights.append(max(int(header.get("examples", 0)), 0))
                tally.memory.append(reported_memory(header))
            if on_client is not None:
                on_client(cid)

        late = sorted(self.exchange(messages, timeout, on_reply))
        for cid in late:
            server.forget(cid)
            if self.stages is not None:
                self.stages.unsure(cid)
            log.warning("round %d: client %d did not reply within %gs: dropped", round_idx, cid, timeout)
        if tally.accepted < self.cfg.deploy.min_replies:
            server.abort_round(f"{tally.accepted} update(s) folded, deploy.min_replies={self.cfg.deploy.min_replies}")
        record = server.close_round()
        out = {"round": round_idx, "cohort": cohort, "accepted": tally.accepted, "train_loss": tally.train_loss(),
               "dropped": len(late) + len(dead), "failed": len(failed), **record, **tally.memory_record(),
               "flower_payload_up": self.wire["up"], "flower_payload_down": self.wire["down"],
               "round_s": time.perf_counter() - t0}
        return out

    # -- messages --------------------------------------------------------------------
    def train_message(self, cid: int, round_idx: int, timeout: float) -> Message:
        """Client ``cid``'s train request: the broadcast; the round's shares under secure aggregation;
        in a continual run the stage (and, when its node lacks it, the regularizer's anchor)."""
        session, payload = self.server.session, self.server.broadcast(cid)
        fields, extra = ({}, None) if self.stages is None else self.stages.train_fields(cid)
        if session is not None:  # (a continual regularizer's anchor and secure aggregation are not deployed together)
            extra = secagg_pack(session.share_message(cid))
        header = self.header("train", round=round_idx, cid=cid, secure=session is not None, **fields)
        return self.message(header, payload, self.node_of[cid], "train", timeout, extra=extra)

    def deliver(self, cid: int, reply: Message, where: str) -> tuple[str, dict]:
        """Hand client ``cid``'s train reply to the server: ``(outcome, reply header)``.

        The outcome is ``folded``, ``rejected`` (the server logged why), ``failed``
        (logged here: a malformed reply, a node-side error, a wrong sender or client id),
        ``dropped`` (Flower's error reply: the node or its ClientApp died) or ``sat_out``.
        """
        self.wire["up"] += payload_size(reply)
        if reply.has_error():
            self.server.forget(cid)
            log.warning("%s: client %d dropped: Flower error %s: %s", where, cid, reply.error.code, reply.error.reason)
            return "dropped", {}
        problem, header, payload = self.reply_problem(reply, self.node_of[cid])
        if problem is None:
            problem = self.train_problem(header, payload, cid)
        if problem is not None:
            self.server.forget(cid)
            log.warning("%s: client %d failed: %s", where, cid, problem)
            return "failed", header
        if header.get("withheld"):  # secure aggregation: it found its own update unfit and sent nothing
            self.server.reject(cid, f"withheld: {header['withheld']}")
            return "rejected", header
        if payload is None:
            self.server.forget(cid)
            return "sat_out", header
        if header.get("masked") and self.server.session is not None:
            return self._masked(cid, header, payload, where), header
        return ("folded" if self.server.receive(payload, cid) else "rejected"), header

    def _masked(self, cid: int, header: dict, payload: bytes, where: str) -> str:
        """A masked summand for the round's secure sum (its own client's, well formed) or ``failed``."""
        try:
            msg = secagg_unpack(payload)
        except ValueError as err:
            msg, problem = None, str(err)
        else:
            problem = None if msg.get("id") == cid else f"a masked input of client {msg.get('id')!r}"
        if problem is not None:
            log.warning("%s: client %d failed: %s", where, cid, problem)
            return "failed"
        clipped = header.get("clipped", 0)
        self.server.session.add_masked(cid, msg, clipped if isinstance(clipped, int) and clipped >= 0 else 0)
        return "folded"

    def message(self, header: dict, payload: bytes | None, node: int, kind: str, ttl: float | None,
                extra: bytes | None = None) -> Message:
        return Message(pack(header, payload, extra), dst_node_id=node, message_type=kind, ttl=ttl)

    def reply_problem(self, reply: Message, node: int) -> tuple[str | None, dict, bytes | None]:
        """``(why reply cannot be used or None, its header, its payload)``; ``reply`` is expected from ``node``."""
        if reply.has_error():  # Flower's own (from the SuperLink): the node died, or its ClientApp failed
            return f"Flower error {reply.error.code}: {reply.error.reason}", {}, None
        if reply.metadata.src_node_id != node:
            return f"reply from node {reply.metadata.src_node_id}, sent to node {node}", {}, None
        try:
            header, payload = unpack(reply.content)
        except MessageError as err:
            return str(err), {}, None
        if "error" in header:
            return f"node error: {header['error']}", header, None
        return None, header, payload

    @staticmethod
    def train_problem(header: dict, payload: bytes | None, cid: int) -> str | None:
        if header.get("cid") != cid:
            return f"reply claims client {header.get('cid')!r}"
        if payload is None and not header.get("sat_out"):
            return "a train reply without an update"
        return None

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self, tensors: dict, orders: dict) -> dict:
        """Which name is which client id (so a resumed server gives every node its old id back)."""
        return {"clock": self.clock, "clients": self.cid_of_name}

    def load_state_dict(self, meta: dict, tensors, orders: dict) -> None:
        self.clock = float(meta.get("clock", 0.0))
        self.cid_of_name = {str(k): int(v) for k, v in meta.get("clients", {}).items()}
