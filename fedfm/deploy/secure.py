"""Secure aggregation over Flower messages: fedfm's own protocol, stage by stage, between the server and nodes.

The protocol (Bonawitz et al. 2017 with the SecAgg+ neighbourhoods of Bell
et al. 2020; :mod:`fedfm.privacy.secagg`) is the one a simulation runs, with
the same server-side :class:`~fedfm.server.secure.SecureRound`; only its
transport changes: :class:`FlowerSecAgg` carries each stage's messages as
Flower queries to the cohort's nodes and returns the replies that arrive
within ``deploy.round_timeout_s``. A node keeps its protocol client between
stages (:meth:`fedfm.deploy.node.NodeWorker.secagg`), receives its shares
with the broadcast, and uploads only its masked summand. A node that dies
after sharing its keys is recovered from the others' Shamir shares (the
round goes on if at least the threshold survive); fewer, and the round
releases nothing.
"""

from __future__ import annotations

import logging
from typing import Mapping

from flwr.app import Message

from fedfm.deploy.messages import payload_size
from fedfm.privacy.secagg_wire import MessageFormatError, pack, unpack

log = logging.getLogger("fedfm")


class FlowerSecAgg:
    """The transport of a :class:`~fedfm.server.secure.SecureRound` over a deployment's nodes."""

    def __init__(self, deployment) -> None:
        self.d = deployment

    def exchange(self, stage: str, msgs: Mapping[int, dict]) -> dict[int, dict]:
        """Send each client its ``stage`` message; the well-formed replies, by client id."""
        d, timeout = self.d, self.d.cfg.deploy.round_timeout_s
        header = {"stage": stage, "round": d.server.round_idx}
        messages = {c: d.message(d.header("secagg", cid=c, **header), pack(m), d.node_of[c], "query", timeout)
                    for c, m in msgs.items()}
        d.wire["down"] += sum(payload_size(m) for m in messages.values())
        replies: dict[int, dict] = {}

        def on_reply(cid: int, reply: Message) -> None:
            d.wire["up"] += payload_size(reply)
            problem, head, payload = d.reply_problem(reply, d.node_of[cid])
            msg = None
            if problem is None:
                try:
                    msg = unpack(payload) if payload is not None else None
                except MessageFormatError as err:
                    problem = str(err)
            if problem is None and (head.get("cid") != cid or msg is None or msg.get("id") != cid):
                problem = f"a {stage} reply that is not client {cid}'s"
            if problem is not None:
                log.warning("round %d: secure aggregation %s: client %d left out: %s", d.server.round_idx, stage,
                            cid, problem)
                return
            replies[cid] = msg

        late = d.exchange(messages, timeout, on_reply)
        for cid in sorted(late):
            log.warning("round %d: secure aggregation %s: client %d did not reply", d.server.round_idx, stage, cid)
        return replies
