"""The node-local channel: a real Unix socket and key between two threads of this process."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
from multiprocessing.connection import AuthenticationError, Client

import pytest

from fedpipe.relay import NodeFolder, ResidentUnavailable, ask, serve


@pytest.fixture
def folder():
    folder = NodeFolder.create()
    yield folder
    folder.remove()


def start(folder: NodeFolder, handle) -> None:
    ready = threading.Event()
    threading.Thread(target=serve, args=(folder, handle, ready), daemon=True).start()
    assert ready.wait(10)


def test_a_round_trip_carries_the_header_and_the_payload_unchanged(folder):
    seen = []

    def handle(header, payload):
        seen.append(header)
        return {"n": len(payload), "echo": header["config"]}, payload[::-1]

    start(folder, handle)
    payload = bytes(range(256)) * 1000
    reply, back = ask(folder.path, {"run_id": 7, "config": {"round": 2, "server": "edge"}}, payload)
    assert reply == {"n": len(payload), "echo": {"round": 2, "server": "edge"}} and back == payload[::-1]
    assert seen == [{"run_id": 7, "config": {"round": 2, "server": "edge"}}]


def test_only_this_user_and_the_key_holder_get_in(folder):
    start(folder, lambda header, payload: ({"ok": True}, b""))
    assert stat.S_IMODE(folder.path.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder.path / "trainer.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.socket.stat().st_mode) == 0o600
    with pytest.raises(AuthenticationError):
        Client(str(folder.socket), family="AF_UNIX", authkey=b"not the key")
    assert ask(folder.path, {}, b"") == ({"ok": True}, b"")  # still serving


def test_a_handler_failure_reply_keeps_the_trainer_serving(folder):
    calls = []

    def handle(header, payload):
        calls.append(payload)
        return ({"error": "bad round"}, b"") if payload == b"bad" else ({"ok": 1}, b"up")

    start(folder, handle)
    assert ask(folder.path, {}, b"bad") == ({"error": "bad round"}, b"")
    assert ask(folder.path, {}, b"good") == ({"ok": 1}, b"up")
    assert calls == [b"bad", b"good"]


def test_no_trainer_listening_is_unavailable_not_an_error(folder, tmp_path):
    with pytest.raises(ResidentUnavailable, match="no resident trainer"):
        ask(folder.path, {}, b"")  # key there, nothing listening
    with pytest.raises(ResidentUnavailable):
        ask(tmp_path / "nowhere", {}, b"")


def test_the_relaying_clientapp_imports_no_torch():
    """The ClientApp process Flower starts per message imports fedpipe.flower_app: that must not
    pull torch (seconds per message) when the resident trainer does the work."""
    code = ("import sys, fedpipe.flower_app, fedpipe.relay; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
