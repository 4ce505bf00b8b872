"""Continual learning deployed over a loopback Grid (real NodeWorkers, no Flower processes).

The server runs the simulation's stage loop; each node cuts its own rows into
stages, keeps its replay buffer and the regularizer's anchor (fedfm.deploy.continual).
"""

from __future__ import annotations

import json

import pytest
import yaml

import fedfm
from deploy_harness import assert_same_run, records
from fedfm.client.state import blob_metadata
from fedfm.config import load_config, to_dict
from fedfm.continual.regularizers import FISHER_KEY
from fedfm.continual.stream import client_stages
from fedfm.deploy.continual import ANCHOR_STAGE, STAGE
from fedfm.deploy.messages import unpack
from fedfm.deploy.serve import check_deployable, serve
from fedfm.deploy.node import STATE_FILE
from fedfm.errors import FedfmError
from test_deploy_driver import LoopbackGrid, honest, setup_with_overrides, task_identity  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CONTINUAL = {"continual.enabled": True, "continual.rounds_per_stage": 2, "continual.replay.enabled": True,
             "continual.replay.capacity": 8, "eval.every": 0}


def test_deployed_continual_run_equals_the_simulation_also_when_the_server_resumes_mid_stage(tmp_path):
    """2 stages on 3 nodes, replay and EWC; the server dies in stage 1's second round and resumes from
    its checkpoint (the nodes keep their streams): the simulation's final state, cohorts, bytes and matrix."""
    extra = {**CONTINUAL, "continual.regularizer.name": "ewc", "continual.regularizer.strength": 10,
             "continual.regularizer.fisher_examples": 8}
    cfg, workers, over = setup_with_overrides(tmp_path, extra)
    good = honest(workers, yaml.safe_dump(to_dict(cfg)))

    def dies_in_round_4(node, message):
        if unpack(message.content)[0].get("round") == 4:
            raise RuntimeError("the server machine lost power")
        return good(node, message)

    with pytest.raises(RuntimeError, match="lost power"):
        serve(LoopbackGrid(dies_in_round_4, workers), cfg)
    grid = LoopbackGrid(good, workers)
    dep = serve(grid, cfg, resume=True)
    trained = {unpack(m.content)[0].get("round") for m in grid.pushed if unpack(m.content)[0]["kind"] == "train"}
    assert trained == {4}  # resumed from the checkpoint after round 3, mid-stage
    sim = fedfm.run(None, [o for o in over if not o.startswith("out=")] + [f"out={tmp_path / 'sim'}"])
    assert_same_run(tmp_path / "sim", tmp_path / "dep")  # also the anchor's bytes, charged in stage 1's first round
    assert dep["continual"]["accuracy_matrix"] == sim["continual"]["accuracy_matrix"]
    assert [r["stage"] for r in records(tmp_path / "dep")] == [0, 0, 1, 1] and dep["final_version"] == 4
    assert all(FISHER_KEY in w.session.client.state for w in workers.values())  # each node's own EWC Fisher


def test_a_node_joining_at_stage_two_gets_the_newest_version_and_trains_on_its_stage_rows(tmp_path):
    extra = {**CONTINUAL, "continual.regularizer.name": "l2", "continual.regularizer.strength": 1,
             "federation.num_clients": 4, "federation.clients_per_round": 4}
    cfg, workers, _ = setup_with_overrides(tmp_path, extra, min_nodes=3)
    good, seen = honest(workers, yaml.safe_dump(to_dict(cfg))), []

    def answer(node, message):
        header, _ = unpack(message.content)
        if header["kind"] == "train":
            seen.append((node, header))
            if header["stage"] == 1 and 103 not in grid.nodes:  # node 103 comes online during stage 1
                grid.nodes.append(103)
        return good(node, message)

    grid = LoopbackGrid(answer, [100, 101, 102])
    dep = serve(grid, cfg)
    rows = records(tmp_path / "dep")
    assert [r["cohort"] for r in rows] == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2, 3]]
    assert rows[-1]["flower_payload_down"] == rows[-1]["bytes_down_total"]  # the anchors travelled, and were counted
    assert rows[-1]["accepted"] == 4 and dep["final_version"] == 4  # its update was folded into version 4
    first = next(h for n, h in seen if n == 103)
    assert (first["round"], first["stage"], first["first_stage"], first["anchor"]) == (4, 1, 1, 1)
    session = workers[103].session
    stages = client_stages(first["stream"], workers[103]._data[1], session.stream.shard)
    assert session.client.train_idx.tolist() == stages[1].tolist()  # its stage-1 rows only (an empty buffer before)
    # its stream (stage, rows, buffer, anchor) is in its state file: a restarted node continues from it
    state = json.loads(blob_metadata((tmp_path / "n3" / STATE_FILE).read_bytes())["clients"])["3"]
    assert state[STAGE] == {"value": 1} and state[ANCHOR_STAGE] == {"value": 1}


@pytest.mark.parametrize("extra, why", [
    ({"asynchronous.enabled": True}, "continual with asynchronous training"),
    ({"continual.regularizer.name": "l2", "privacy.secure_aggregation.enabled": True}, "both ride"),
    ({"privacy.client_dp.enabled": True, "privacy.client_dp.noise_multiplier": 1.0}, "privacy.client_dp"),
])
def test_what_a_deployed_continual_run_refuses_in_one_line(tmp_path, extra, why):
    cfg = load_config(None, [f"{k}={v}" for k, v in {"continual.enabled": True, "out": tmp_path, **extra}.items()])
    with pytest.raises(FedfmError, match=why):
        check_deployable(cfg)
