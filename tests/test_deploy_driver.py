"""The deployment driver over a loopback Grid: what it does with bad replies, without processes.

The real transport is tested end to end in ``test_deploy.py``; here a
loopback Grid answers each pushed message at once with a real Flower reply
produced by a real :class:`~fedfm.deploy.node.NodeWorker` (or by a hostile
node), so every reply path of the driver runs deterministically in-process.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from flwr.app import Error, Message

import fedfm
from deploy_harness import assert_same_run, node_files, overrides
from fedfm.algorithms.base import Update
from fedfm.compression.wire import encode_update
from fedfm.config import load_config, to_dict
from fedfm.deploy.messages import pack, unpack, unpack_extra
from fedfm.deploy.node import NodeWorker
from fedfm.deploy.serve import build_server_run, serve
from golden import write_topic_csv


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the run and node of the process (set by Flower's own processes)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


class LoopbackGrid:
    """A Grid whose nodes answer pushed messages immediately (``answer(node, message) -> Message``)."""

    def __init__(self, answer, nodes, slow: dict[int, int] | None = None) -> None:
        """``slow``: node -> how many pulls its replies take to arrive (a straggler)."""
        self.answer, self.nodes, self.replies, self.pushed = answer, list(nodes), {}, []
        self.slow, self.pulls = slow or {}, 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            mid = f"m{len(self.pushed)}-{i}"
            m.metadata.__dict__["_message_id"] = mid
            self.pushed.append(m)
            reply = self.answer(m.metadata.dst_node_id, m)
            if reply is not None:
                self.replies[mid] = (self.pulls + self.slow.get(m.metadata.dst_node_id, 0), reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = [mid for mid in message_ids if mid in self.replies and self.replies[mid][0] < self.pulls]
        return [self.replies.pop(mid)[1] for mid in ready]


def reply_to(message: Message, node: int, header: dict, payload=None) -> Message:
    reply = Message(pack(header, payload), reply_to=message)
    assert reply.metadata.src_node_id == node  # Flower addresses a reply from the node it was sent to
    return reply


def setup(tmp_path, extra=None, **deploy):
    cfg, workers, _ = setup_with_overrides(tmp_path, {"federation.clients_per_round": 3, **(extra or {})}, **deploy)
    return cfg, workers


def setup_with_overrides(tmp_path, extra, **deploy):
    """``(config, {node id: NodeWorker}, the overrides)``: one worker per simulated client, on its own rows."""
    data = write_topic_csv(tmp_path / "topics.csv")
    over = overrides({"data.dataset": data, "deploy.insecure": True, "out": tmp_path / "dep",
                      **{f"deploy.{k}": v for k, v in deploy.items()}, **extra})
    paths = node_files(tmp_path, over)
    cfg = load_config(None, over)
    workers = {100 + i: NodeWorker(p, f"client-{i:03d}", tmp_path / f"n{i}") for i, p in enumerate(paths)}
    return cfg, workers, over


def honest(workers, config_text):
    def answer(node, message):
        header, payload = unpack(message.content)
        out_header, out = workers[node].handle({**header, "config": config_text}, payload, unpack_extra(message.content))
        return reply_to(message, node, out_header, out)

    return answer


def test_bad_replies_are_rejected_and_the_round_goes_on(tmp_path, caplog):
    cfg, workers = setup(tmp_path, {"federation.num_clients": 5, "federation.clients_per_round": 5})
    text = yaml.safe_dump(to_dict(cfg))
    good = honest(workers, text)

    def answer(node, message):  # 101: NaN, 102: another client's id, 103: dies, 104: claims 1e15 examples
        header, _ = unpack(message.content)
        if header["kind"] == "train" and node == 103:
            return Message(Error(code=0, reason="the ClientApp process was killed"), reply_to=message)
        reply = good(node, message)
        if header["kind"] != "train" or node == 100:
            return reply
        if node == 101:
            state = r.server.global_state
            nan = Update(client_id=header["cid"], num_examples=5, metrics={"train_loss": 1.0},
                         delta={k: torch.full_like(v, math.nan) for k, v in state.items()})
            return reply_to(message, node, {"cid": header["cid"], "loss": 1.0, "examples": 5}, encode_update(nan))
        rh, payload = unpack(reply.content)
        if node == 102:
            return reply_to(message, node, {**rh, "cid": 0}, payload)
        inflated = Update(client_id=header["cid"], num_examples=10**15, metrics={"train_loss": 1.0},
                          delta={k: torch.zeros_like(v) for k, v in r.server.global_state.items()})
        return reply_to(message, node, rh, encode_update(inflated))

    grid = LoopbackGrid(answer, workers)
    r = build_server_run(cfg, grid)
    r.sim.join(5, 10)
    assert r.sim.cid_of_name == {f"client-00{i}": i for i in range(5)}
    record = r.sim.run_round(1)
    assert record["cohort"] == [0, 1, 2, 3, 4] and record["accepted"] == 1
    assert (record["failed"], record["dropped"]) == (1, 1)  # wrong client id; the dead node
    assert record["version"] == 1 and "aborted" not in record  # the round went on with the good update
    reasons = [x["reason"] for x in r.server.rejected]
    assert any("NaN" in x for x in reasons) and any("claims 1000000000000000 training examples" in x for x in reasons)
    assert "reply claims client 0" in caplog.text and "the ClientApp process was killed" in caplog.text


def test_too_few_replies_release_nothing(tmp_path):
    cfg, workers = setup(tmp_path, min_replies=2, round_timeout_s=0.5)
    good = honest(workers, yaml.safe_dump(to_dict(cfg)))

    def answer(node, message):  # only node 100 answers train messages: the others are dead
        header, _ = unpack(message.content)
        return good(node, message) if header["kind"] == "hello" or node == 100 else None

    grid = LoopbackGrid(answer, workers)
    r = build_server_run(cfg, grid)
    r.sim.join(3, 10)
    before = {k: v.clone() for k, v in r.server.global_state.items()}
    record = r.sim.run_round(1)
    assert (record["accepted"], record["dropped"]) == (1, 2)
    assert "aborted" in record and record["version"] == 0
    assert all(torch.equal(before[k], v) for k, v in r.server.global_state.items())


def test_fedbuff_through_the_grid_folds_stale_replies(tmp_path):
    cfg, workers = setup(tmp_path, {"asynchronous.enabled": True, "asynchronous.buffer_size": 2,
                                    "asynchronous.concurrency": 2, "federation.rounds": 3})
    grid = LoopbackGrid(honest(workers, yaml.safe_dump(to_dict(cfg))), workers, slow={102: 3})
    r = build_server_run(cfg, grid)
    r.sim.join(3, 10)
    steps = [r.engine.step(k) for k in (1, 2, 3)]
    assert [(s["accepted"], s["version"]) for s in steps] == [(2, 1), (2, 2), (2, 3)]
    assert r.server.version == 3 and max(r.server.staleness_seen) >= 1  # the straggler's update was stale
    assert r.engine.summary()["clients_started"] >= 6
    assert steps[-1]["flower_payload_up"] == steps[-1]["bytes_up_total"]


@pytest.mark.parametrize("extra", [
    {"privacy.client_dp.enabled": True, "privacy.client_dp.noise_multiplier": 0.5, "privacy.client_dp.clip_norm": 0.5,
     "privacy.reproducible_noise": True},
    {"robust.rule": "median", "federation.clients_per_round": 3},
    {"algorithm.name": "scaffold", "train.optimizer": "sgd", "train.lr": 0.05},
    {"personalization.method": "fedper"},
    {"privacy.secure_aggregation.enabled": True, "federation.clients_per_round": 3},
    {"privacy.secure_aggregation.enabled": True, "privacy.client_dp.enabled": True, "federation.clients_per_round": 3,
     "privacy.client_dp.noise_multiplier": 0.5, "privacy.client_dp.clip_norm": 0.5, "privacy.reproducible_noise": True},
], ids=["client_dp", "median", "scaffold", "fedper", "secagg", "secagg_client_dp"])
def test_server_and_node_features_compose_as_in_simulation(tmp_path, extra):
    """Client-level DP, a robust rule, SCAFFOLD's client state, FedPer's personal head: deployed = simulated."""
    cfg, workers, over = setup_with_overrides(tmp_path, extra)
    serve(LoopbackGrid(honest(workers, yaml.safe_dump(to_dict(cfg))), workers), cfg)
    fedfm.run(None, [o for o in over if not o.startswith("out=")] + [f"out={tmp_path / 'sim'}"])
    assert_same_run(tmp_path / "sim", tmp_path / "dep")


def test_secure_aggregation_survives_a_node_dying_after_sharing_keys(tmp_path, caplog):
    """Node 102 answers the key stages, then dies: its masks are recovered from the others' shares."""
    cfg, workers = setup(tmp_path, {"privacy.secure_aggregation.enabled": True})
    good = honest(workers, yaml.safe_dump(to_dict(cfg)))

    def answer(node, message):
        header, _ = unpack(message.content)
        if node == 102 and header["kind"] == "train":
            return Message(Error(code=0, reason="node lost power"), reply_to=message)
        return good(node, message)

    r = build_server_run(cfg, LoopbackGrid(answer, workers))
    r.sim.join(3, 10)
    before = {k: v.clone() for k, v in r.server.global_state.items()}
    record = r.sim.run_round(1)
    assert (record["secagg_survivors"], record["secagg_dropped"], record["dropped"]) == (2, 1, 1)
    assert record["version"] == 1 and "aborted" not in record
    assert any(not torch.equal(before[k], v) for k, v in r.server.global_state.items())
    assert record["flower_payload_up"] == record["bytes_up_total"]
    assert record["flower_payload_down"] == record["bytes_down_total"]
