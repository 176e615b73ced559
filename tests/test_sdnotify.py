"""sd_notify against real AF_UNIX datagram sockets, as systemd would receive it."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from watchdog.sdnotify import Notifier


@pytest.fixture
def receiver(tmp_path, monkeypatch):
    """A bound datagram socket standing in for systemd; NOTIFY_SOCKET points at it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_messages_arrive(receiver):
    n = Notifier.from_env()
    assert n.enabled
    assert n.ready()
    assert receiver.recv(4096) == b"READY=1"
    assert n.status("tick 3: 2 replicas,\nall well")
    assert receiver.recv(4096) == b"STATUS=tick 3: 2 replicas, all well"  # one line, one datagram
    assert n.watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"
    assert n.stopping()
    assert receiver.recv(4096) == b"STOPPING=1"
    assert n.send("STATUS=x", "EXTEND_TIMEOUT_USEC=5000000")
    assert receiver.recv(4096) == b"STATUS=x\nEXTEND_TIMEOUT_USEC=5000000"
    n.close()


def test_abstract_socket(monkeypatch):
    name = f"heygem-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        n = Notifier.from_env()
        assert n.ready()
        assert sock.recv(4096) == b"READY=1"
        n.close()


def test_unset_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_env()
    assert not n.enabled
    assert n.ready() and n.watchdog() and n.stopping()


def test_send_failure_returns_false(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    n = Notifier.from_env()
    assert n.enabled
    assert n.ready() is False  # no exception into the daemon
    n.close()


def test_unset_removes_variables_for_children(receiver, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_env(unset=True)
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert n.watchdog_interval() == 2.0
    assert n.ready()
    assert receiver.recv(4096) == b"READY=1"
    n.close()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "OURS"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env, expected):
    env = {k: str(os.getpid()) if v == "OURS" else v for k, v in env.items()}
    assert Notifier.from_env(env).watchdog_interval() == expected


@pytest.mark.parametrize("value, expected", [("/run/systemd/notify", "/run/systemd/notify"), ("@x", b"\0x"), ("", None), ("vsock:2:9", None)])
def test_address_forms(value, expected):
    assert Notifier.from_env({"NOTIFY_SOCKET": value}).address == expected


def test_full_receiver_times_out_instead_of_blocking(receiver):
    """systemd not reading: the send gives up after its timeout and reports False."""
    n = Notifier(receiver.getsockname(), timeout_s=0.2)
    sent = 0
    while n.watchdog():
        sent += 1
        assert sent < 100_000, "the receive queue never filled"
    assert sent > 0  # it worked until the queue was full, then timed out instead of hanging
    n.close()
