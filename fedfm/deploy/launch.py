"""The processes a deployment is made of, as a user starts them (``fedfm deploy ...``).

* :func:`superlink` — Flower's SuperLink on the server machine (one HTTPS
  port for nodes, submissions and the ServerApp; state in a SQLite file so a
  restarted SuperLink remembers registered nodes);
* :func:`node` — one edge device: fedfm's resident worker
  (:mod:`fedfm.deploy.node`) plus Flower's SuperNode, started as its child
  with the worker's folder in its node config; the SuperNode dies with it;
* :func:`submit` — submits a run: writes a tiny Flower app whose components
  are fedfm's ServerApp and ClientApp and whose run config carries the
  resolved YAML, and hands it to ``flwr run`` (which streams the run's log).

TLS is the default everywhere; plain HTTP needs an explicit ``--insecure``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import tomli_w

from fedfm.errors import FedfmError

APP_COMPONENTS = {"serverapp": "fedfm.deploy.server_app:app", "clientapp": "fedfm.deploy.client_app:app"}


def flower_env(home: Path | None = None) -> dict:
    """The environment for Flower's commands: this interpreter's bin folder first on PATH (Flower spawns
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` from PATH)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def flower_bin(name: str) -> str:
    path = shutil.which(name, path=flower_env()["PATH"])
    if path is None:
        raise FedfmError(f"`{name}` not found: install Flower (pip install 'flwr==1.42.0')")
    return path


def tls_flags(insecure: bool, files: dict[str, str | None], flags: dict[str, str]) -> list[str]:
    """``--insecure``, or the certificate flags (every file must exist); refuses a silent plain-HTTP start."""
    if insecure:
        return ["--insecure"]
    missing = [k for k, v in files.items() if not v]
    if missing:
        raise FedfmError(f"TLS needs {', '.join('--' + k.replace('_', '-') for k in missing)} "
                         "(or --insecure to run without TLS, unencrypted)")
    out = []
    for key, path in files.items():
        if not Path(path).is_file():
            raise FedfmError(f"{key.replace('_', ' ')} file not found: {path}")
        out += [flags[key], str(Path(path).resolve())]
    return out


def superlink_command(address: str, state_dir: Path, *, insecure: bool, ca: str | None, cert: str | None,
                      key: str | None, auth: bool) -> list[str]:
    host, port = split_address(address)
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation", "--database", str(state_dir / "superlink.db")]
    cmd += tls_flags(insecure, {"ca": ca, "cert": cert, "key": key},
                     {"ca": "--ssl-ca-certfile", "cert": "--ssl-certfile", "key": "--ssl-keyfile"})
    if auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def supernode_command(superlink: str, worker_dir: Path, *, insecure: bool, root_certificates: str | None,
                      auth_key: str | None) -> list[str]:
    split_address(superlink)
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(free_port()),
           "--node-config", f'fedfm-node="{worker_dir.resolve()}"']
    cmd += tls_flags(insecure, {"root_certificates": root_certificates}, {"root_certificates": "--root-certificates"})
    if auth_key is not None:
        if not Path(auth_key).is_file():
            raise FedfmError(f"node key file not found: {auth_key}")
        cmd += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    return cmd


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedfmError(f"address must be HOST:PORT, got {address!r}")
    return host, int(port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a child: get SIGTERM when the parent dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def supervise(cmd: list[str], env: dict, on_start=None) -> int:
    """Run ``cmd`` as a child that dies with us; forward SIGTERM/SIGINT; its exit code."""
    child = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)

    def stop(signum, _frame):
        child.terminate()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_start is not None:
            on_start(child)
        return child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


def superlink(address: str, state_dir: str | Path, **tls) -> int:
    """Run the SuperLink until it stops; its exit code."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    home = state_dir / "flwr-home"
    return supervise(superlink_command(address, state_dir, **tls), flower_env(home))


def node(data: str | Path, superlink: str, state_dir: str | Path, *, name: str | None = None,
         threads: int | None = None, **tls) -> int:
    """Run one node (resident worker + SuperNode) until the SuperNode stops; its exit code."""
    import logging

    from fedfm.deploy.link import serve
    from fedfm.deploy.node import NodeWorker

    logging.getLogger("fedfm").setLevel(logging.INFO)

    data = Path(data)
    if not data.exists():
        raise FedfmError(f"node data not found: {data}")
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    worker_dir = state_dir / "worker"
    cmd = supernode_command(superlink, worker_dir, **tls)
    worker = NodeWorker(data, name or socket.gethostname(), state_dir, threads=threads)
    stopping = threading.Event()
    threading.Thread(target=serve, args=(worker_dir, worker.handle, stopping.is_set), daemon=True).start()
    try:
        return supervise(cmd, flower_env(state_dir / "flwr-home"))
    finally:
        stopping.set()


def app_folder(folder: Path, config_text: str, resume: bool) -> Path:
    """A Flower app (just its pyproject.toml) whose components are fedfm's and whose run config is the run's."""
    folder.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedfm-run", "version": "1.0.0", "description": "a fedfm run",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "fedfm", "components": APP_COMPONENTS,
                                  "config": {"fedfm-config": config_text, "fedfm-resume": resume}}}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return folder


def connection_home(folder: Path, address: str, root_certificates: str | None, insecure: bool) -> Path:
    """A FLWR_HOME whose default connection is the SuperLink at ``address``."""
    split_address(address)
    conn: dict = {"address": address}
    if insecure:
        conn["insecure"] = True
    else:
        if not root_certificates or not Path(root_certificates).is_file():
            raise FedfmError("deploy.root_certificates must name the CA certificate of the SuperLink "
                             f"(got {root_certificates!r}), or set deploy.insecure=true to submit unencrypted")
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "fedfm", "fedfm": conn}}))
    return folder


def submit(cfg, resume: bool = False, stream: bool = True) -> int:
    """Submit ``cfg`` (a RunConfig) to its SuperLink; with ``stream``, follow its log until it ends."""
    import yaml

    from fedfm.config import to_dict
    from fedfm.deploy.serve import check_deployable

    if cfg.out is not None:
        cfg = cfg.model_copy(update={"out": str(Path(cfg.out).expanduser().absolute())})
    check_deployable(cfg)
    d = cfg.deploy
    with tempfile.TemporaryDirectory(prefix="fedfm-submit-") as tmp:
        app = app_folder(Path(tmp) / "app", yaml.safe_dump(to_dict(cfg), sort_keys=False), resume)
        home = connection_home(Path(tmp) / "home", d.superlink, d.root_certificates, d.insecure)
        env = flower_env(home)
        cmd = [flower_bin("flwr"), "run", str(app), "fedfm"] + (["--stream"] if stream else [])
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run_id = None
        for line in proc.stdout:  # shown as it comes; the run id is read off it
            sys.stdout.write(line)
            sys.stdout.flush()
            if run_id is None and (found := re.search(r"started run (\d+)", line)):
                run_id = int(found.group(1))
        code = proc.wait()
        if code != 0 or run_id is None or not stream:
            return code or int(run_id is None)
        status, details = run_status(run_id, env)
        if not status.endswith("completed"):
            print(f"fedfm: run {run_id} ended {status}{': ' + details if details else ''}", file=sys.stderr)
            return 1
        return 0


def run_status(run_id: int, env: dict) -> tuple[str, str]:
    """``(status, details)`` of a run as the SuperLink reports it (``finished:completed`` when it succeeded)."""
    out = subprocess.run([flower_bin("flwr"), "ls", "fedfm", "--run-id", str(run_id), "--format", "json"], env=env,
                         capture_output=True, text=True)
    try:
        run = json.loads(out.stdout)["runs"][0]
        return str(run["status"]), str(run.get("status-details") or "")
    except (ValueError, KeyError, IndexError):
        lines = (out.stdout + out.stderr).strip().splitlines()
        return "unknown", lines[-1] if lines else ""


def register(public_key: str | Path, superlink: str, root_certificates: str | None, insecure: bool) -> int:
    """Register a node's public key with a SuperLink started with node authentication (``flwr supernode register``)."""
    if not Path(public_key).is_file():
        raise FedfmError(f"node public key not found: {public_key}")
    with tempfile.TemporaryDirectory(prefix="fedfm-register-") as tmp:
        home = connection_home(Path(tmp), superlink, root_certificates, insecure)
        cmd = [flower_bin("flwr"), "supernode", "register", str(Path(public_key).resolve()), "fedfm"]
        return subprocess.call(cmd, env=flower_env(home))


def follow(run_id: int, cfg) -> int:
    """Stream a submitted run's log again (after ``submit --no-stream`` or a closed terminal)."""
    d = cfg.deploy
    with tempfile.TemporaryDirectory(prefix="fedfm-log-") as tmp:
        env = flower_env(connection_home(Path(tmp), d.superlink, d.root_certificates, d.insecure))
        code = subprocess.call([flower_bin("flwr"), "log", str(run_id), "fedfm", "--stream"], env=env)
        status, details = run_status(run_id, env)
        print(f"fedfm: run {run_id}: {status}{': ' + details if details else ''}", file=sys.stderr)
        return code or int(not status.endswith("completed"))
