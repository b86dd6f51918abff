"""The local channel between a node's short-lived Flower ClientApp and its resident trainer.

Flower runs one ClientApp process per message, so a node that loaded its model there would load
it every round. `fedpipe node` keeps one trainer process for the node's lifetime instead
(`fedpipe.resident`); the ClientApp only relays a round's bytes to it and its reply back.

The channel is a Unix socket in a private folder (mode 0700, the socket 0600) that only this
user can reach, authenticated with a random key kept beside it (mode 0600):
`multiprocessing.connection`'s HMAC challenge. Frames are a JSON header and one raw payload each
way, never pickles. Torch-free, so a relaying ClientApp does not import torch.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import (
    AuthenticationError,
    Client,
    Connection,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path

SOCKET, KEY = "trainer.sock", "trainer.key"

Handler = Callable[[dict, bytes], tuple[dict, bytes]]


class ResidentUnavailable(Exception):
    """No resident trainer answers at the folder (not started, stopped, or killed)."""


@dataclass(frozen=True)
class NodeFolder:
    """Where one node's resident trainer listens: its socket and its key."""

    path: Path

    @property
    def socket(self) -> Path:
        return self.path / SOCKET

    @classmethod
    def create(cls) -> NodeFolder:
        """A fresh private folder (mkdtemp: mode 0700) with a new random key (mode 0600)."""
        folder = cls(Path(tempfile.mkdtemp(prefix="fedpipe-node-")))
        fd = os.open(folder.path / KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        return folder

    def key(self) -> bytes:
        return (self.path / KEY).read_bytes()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def send(conn: Connection, header: dict, payload: bytes) -> None:
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(payload)


def receive(conn: Connection) -> tuple[dict, bytes]:
    header = json.loads(conn.recv_bytes().decode())
    return header, conn.recv_bytes()


def ask(folder: str | Path, header: dict, payload: bytes) -> tuple[dict, bytes]:
    """One request to the resident trainer at `folder`, and its reply.

    Raises ResidentUnavailable when nothing listens there (the caller then does the work itself);
    a trainer that goes away mid-request is an error of that request (ConnectionError).
    """
    folder = NodeFolder(Path(folder))
    try:
        conn = Client(str(folder.socket), family="AF_UNIX", authkey=folder.key())
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise ResidentUnavailable(f"no resident trainer at {folder.path} ({e.strerror})") from None
    with conn:
        send(conn, header, payload)
        try:
            return receive(conn)
        except EOFError:
            raise ConnectionError(f"the resident trainer at {folder.path} closed the channel "
                                  "before replying (it stopped or crashed)") from None


def serve(folder: NodeFolder, handle: Handler, ready: threading.Event | None = None) -> None:
    """Answer requests one at a time, forever (run it in a daemon thread).

    `handle` must turn its own failures into a reply header: a failed message leaves the trainer
    serving. A peer that fails the key challenge or hangs up mid-frame is dropped. The socket is
    plain (not a `Listener`, whose exit hook would unlink it after the folder is gone); the key
    challenge is the one `Listener.accept` runs.
    """
    key = folder.key()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(folder.socket))
        os.chmod(folder.socket, 0o600)
        server.listen()
        if ready is not None:
            ready.set()
        while True:
            peer, _ = server.accept()
            with Connection(peer.detach()) as conn:
                try:
                    deliver_challenge(conn, key)
                    answer_challenge(conn, key)
                    header, payload = receive(conn)
                except (AuthenticationError, EOFError, OSError, ValueError):
                    continue
                reply = handle(header, payload)
                try:
                    send(conn, *reply)
                except OSError:  # the ClientApp was stopped while this round trained
                    continue
