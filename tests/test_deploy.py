"""Deployment on Flower (issue 16): a real SuperLink and real SuperNodes on 127.0.0.1, started by the test.

Each node holds exactly the rows a simulated client with the same id holds
(int8 uploads with error feedback: the residual lives on the node);
node names sort in client-id order, so the server samples the same cohorts
as the simulation. Local training, the wire and the server's fold are the
same code, so the deployed run's final state must equal the simulation's
(compared exactly: nothing in the path is nondeterministic on one machine).
"""

from __future__ import annotations

import json
import re

import pytest

import fedfm
from deploy_harness import Cluster, assert_same_run, free_port, node_files, overrides, records
from golden import write_topic_csv

pytestmark = pytest.mark.deploy


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


def simulate(tmp_path, over):
    fedfm.run(None, over + [f"out={tmp_path / 'sim'}"])
    return tmp_path / "sim"


def start_nodes(cluster, paths, address, tls: list[str], keys=None) -> None:
    for i, path in enumerate(paths):
        key = [] if keys is None else ["--key", str(keys[i])]
        cluster.start(f"node{i}", "deploy", "node", "--data", str(path), "--name", f"client-{i:03d}",
                      "--state", f"state{i}", "--superlink", address, "--threads", "1", *tls, *key)
    for i in range(len(paths)):
        cluster.wait_for(f"node{i}", "SuperNode ID")


def test_deployed_run_equals_simulation_with_tls_and_node_authentication(tmp_path, cluster):
    data = write_topic_csv(tmp_path / "topics.csv")
    address = f"127.0.0.1:{free_port()}"
    certs = tmp_path / "certs"
    over = overrides({"data.dataset": data, "deploy.superlink": address, "deploy.root_certificates": certs / "ca.crt",
                      "compression.upload": "[int8]", "compression.error_feedback": True})
    paths = node_files(tmp_path, over)
    made = cluster.run("deploy", "credentials", str(certs), *[a for i in range(3) for a in ("--node", f"client-{i:03d}")],
                       "--node", "stranger")
    assert made.returncode == 0, made.stderr
    cluster.start("superlink", "deploy", "superlink", "--address", address, "--state", "sl", "--certs", str(certs))
    cluster.wait_for("superlink", "Application startup complete")
    tls = ["--root-certificates", str(certs / "ca.crt")]
    for i in range(3):
        reg = cluster.run("deploy", "register", str(certs / f"client-{i:03d}.pub"), "--superlink", address, *tls)
        assert reg.returncode == 0, reg.stdout + reg.stderr
    # a node whose key was never registered is refused by the SuperLink and exits non-zero
    stranger = cluster.start("stranger", "deploy", "node", "--data", str(paths[0]), "--name", "stranger",
                             "--state", "stranger", "--superlink", address, *tls, "--key", str(certs / "stranger.key"))
    assert stranger.wait(60) != 0
    assert "Failed to activate SuperNode" in cluster.log("stranger")
    # without TLS settings a node does not start at all (one line, no silent plain HTTP)
    plain = cluster.run("deploy", "node", "--data", str(paths[0]), "--superlink", address, timeout_s=60)
    assert plain.returncode == 2 and "--insecure" in plain.stderr
    start_nodes(cluster, paths, address, tls, keys=[certs / f"client-{i:03d}.key" for i in range(3)])
    done = cluster.run("deploy", "submit", *over, f"out={tmp_path / 'dep'}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_run(simulate(tmp_path, over), tmp_path / "dep")
    last = records(tmp_path / "dep")[-1]  # the ledger counts exactly the payload bytes Flower carried
    assert (last["flower_payload_up"], last["flower_payload_down"]) == (last["bytes_up_total"], last["bytes_down_total"])
    nodes = json.loads((tmp_path / "dep" / "partition.json").read_text())["nodes"]
    assert {n: v["client"] for n, v in nodes.items()} == {"client-000": 0, "client-001": 1, "client-002": 2}


def wait_until(check, timeout_s: float, what: str):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := check()):
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_node_killed_mid_round_is_dropped_and_rejoins_under_secure_aggregation(tmp_path, cluster):
    """The node dies after sharing its keys: its masks are recovered from the others' shares, the round goes on."""
    data = write_topic_csv(tmp_path / "topics.csv")
    address = f"127.0.0.1:{free_port()}"
    over = overrides({"data.dataset": data, "deploy.superlink": address, "deploy.insecure": True,
                      "federation.clients_per_round": 3, "federation.rounds": 3, "deploy.round_timeout_s": 20,
                      "privacy.secure_aggregation.enabled": True})
    paths = node_files(tmp_path, over)
    cluster.start("superlink", "deploy", "superlink", "--address", address, "--state", "sl", "--insecure")
    cluster.wait_for("superlink", "Application startup complete")
    start_nodes(cluster, paths, address, ["--insecure"])
    run = cluster.start("submit", "deploy", "submit", *over, f"out={tmp_path / 'dep'}")
    # node 2 dies as soon as round 2's message reaches it (the second train message it receives)
    wait_until(lambda: cluster.log("node2").count("Receiving: train message") >= 2, 180, "round 2 at node 2")
    cluster.kill("node2")
    cluster.start("node2", "deploy", "node", "--data", str(paths[2]), "--name", "client-002", "--state", "state2",
                  "--superlink", address, "--threads", "1", "--insecure")
    assert run.wait(300) == 0, cluster.log("submit")[-3000:]
    rows = {r["round"]: r for r in records(tmp_path / "dep")}
    assert (rows[1]["accepted"], rows[1]["dropped"]) == (3, 0)
    # the round closed without it: Flower reported the dead node (or the deadline passed)
    assert (rows[2]["accepted"], rows[2]["dropped"], rows[2]["failed"]) == (2, 1, 0)
    assert (rows[2]["secagg_survivors"], rows[2]["secagg_dropped"], rows[2]["version"]) == (2, 1, 2)
    assert (rows[3]["accepted"], rows[3]["dropped"]) == (3, 0)  # the restarted node took its client id back
    assert rows[3]["flower_payload_up"] == rows[3]["bytes_up_total"]
    assert "round 2: client 2 d" in cluster.log("submit") and "takes over client 2" in cluster.log("submit")


def test_killed_server_resumes_to_the_uninterrupted_model(tmp_path, cluster):
    data = write_topic_csv(tmp_path / "topics.csv")
    address = f"127.0.0.1:{free_port()}"
    over = overrides({"data.dataset": data, "deploy.superlink": address, "deploy.insecure": True,
                      "federation.rounds": 3})
    paths = node_files(tmp_path, over)
    superlink = ("deploy", "superlink", "--address", address, "--state", "sl", "--insecure")
    cluster.start("superlink", *superlink)
    cluster.wait_for("superlink", "Application startup complete")
    start_nodes(cluster, paths, address, ["--insecure"])
    dep = tmp_path / "dep"
    cluster.start("submit", "deploy", "submit", *over, f"out={dep}")
    wait_until(lambda: list((dep / "checkpoints").glob("*1*")) if (dep / "checkpoints").is_dir() else None,
               240, "round 1's checkpoint")
    cluster.kill("superlink")  # with the ServerApp under it
    cluster.kill("submit")
    assert not (dep / "summary.json").exists()
    cluster.start("superlink", *superlink)
    cluster.wait_for("superlink", "Application startup complete")
    started = cluster.run("deploy", "submit", *over, f"out={dep}", "--resume", "--no-stream")
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    run_id = re.search(r"started run (\d+)", started.stdout).group(1)
    followed = cluster.run("deploy", "log", run_id, *over)  # follows the resumed run to its end
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
    assert "completed" in followed.stderr
    assert_same_run(simulate(tmp_path, over), dep)
