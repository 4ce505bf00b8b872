"""The local link between a node's per-message ClientApp process and its resident worker.

Flower starts a new ClientApp process for every message; loading a foundation
model in each would cost seconds to minutes per round. So ``fedfm deploy node``
keeps one worker process per node (:mod:`fedfm.deploy.node`) with the model,
the data and the client's private state in memory, listening on a Unix socket
in the node's state folder, and the ClientApp forwards each message to it.

One request or reply is two frames: a JSON header and the payload bytes
(empty when none). Frames go through :mod:`multiprocessing.connection`'s
``send_bytes``/``recv_bytes`` only (never its pickling ``send``/``recv``),
and the connection is authenticated with a per-node random key kept next to
the socket with owner-only permissions.
"""

from __future__ import annotations

import json
import os
import secrets
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Callable

SOCKET, KEY = "worker.sock", "worker.key"
MAX_FRAME = 1 << 34  # 16 GiB: a payload is at most a full model


class LinkError(RuntimeError):
    """The node's worker cannot be reached or broke the protocol."""


def send(conn: Connection, header: dict, payload: bytes | None, extra: bytes | None = None) -> None:
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(payload or b"")
    conn.send_bytes(extra or b"")


def receive(conn: Connection) -> tuple[dict, bytes | None, bytes | None]:
    header = json.loads(conn.recv_bytes(1 << 20).decode())
    payload = conn.recv_bytes(MAX_FRAME)
    extra = conn.recv_bytes(MAX_FRAME)
    if not isinstance(header, dict):
        raise LinkError("the worker link carried a header that is not a JSON object")
    return header, (payload or None), (extra or None)


def call(folder: str | Path, header: dict, payload: bytes | None = None,
         extra: bytes | None = None) -> tuple[dict, bytes | None]:
    """Send one request to the worker serving ``folder`` and wait for its reply ``(header, payload)``."""
    folder = Path(folder)
    try:
        key = (folder / KEY).read_bytes()
        with Client(str(folder / SOCKET), family="AF_UNIX", authkey=key) as conn:
            send(conn, header, payload, extra)
            reply, out, _ = receive(conn)
            return reply, out
    except (OSError, EOFError, ValueError) as err:
        raise LinkError(f"cannot reach the fedfm node worker in {folder}: {type(err).__name__}: {err}") from None


def serve(folder: str | Path, handle: Callable[..., tuple[dict, bytes | None]],
          stop: Callable[[], bool] = lambda: False) -> None:
    """Answer requests one after another with ``handle`` until ``stop()`` (checked between requests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    sock, key_path = folder / SOCKET, folder / KEY
    sock.unlink(missing_ok=True)
    key = secrets.token_bytes(32)
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.write_bytes(key)
    with Listener(str(sock), family="AF_UNIX", authkey=key) as listener:
        while not stop():
            try:
                conn = listener.accept()
            except (OSError, EOFError) as err:  # a failed handshake: a stranger or a dead ClientApp
                if stop():
                    break
                print(f"fedfm node: refused a connection on {sock}: {type(err).__name__}: {err}", flush=True)
                continue
            with conn:
                try:
                    header, payload, extra = receive(conn)
                    send(conn, *handle(header, payload, extra))
                except (OSError, EOFError, ValueError, LinkError) as err:
                    print(f"fedfm node: dropped a request: {type(err).__name__}: {err}", flush=True)
