"""The namespace network of the speed benchmark: built, connected, capped, and always removed.

Needs root and iproute2; without them the tests check that the error says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from benchmarks.netns import NetnsError, VirtualNetwork, check_tools, list_namespaces, parse_rate

CAN_BUILD = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
needs_root = pytest.mark.skipif(not CAN_BUILD, reason="needs root and iproute2 (ip, tc)")

# a one-shot TCP server: accept one client, read until EOF, reply with the byte count
SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
s.settimeout(15)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(15)
n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    n += len(b)
c.sendall(str(n).encode())
c.close()
"""
# connect, send N bytes, half-close, print the reply and the seconds the exchange took
CLIENT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
t = time.perf_counter()
c.sendall(b"x" * int(sys.argv[3]))
c.shutdown(socket.SHUT_WR)
reply = c.recv(64).decode()
print(reply, time.perf_counter() - t)
"""


def exchange(net: VirtualNetwork, nbytes: int) -> tuple[int, float]:
    """Send ``nbytes`` from worker 1 to worker 0; return what the server counted and seconds."""
    addr, port = net.addresses[0], "29411"
    server = subprocess.Popen(
        [*net.exec_prefix(0), sys.executable, "-c", SERVER, addr, port],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        out = subprocess.run(
            [*net.exec_prefix(1), sys.executable, "-c", CLIENT, addr, port, str(nbytes)],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()
        return int(out[0]), float(out[1])
    finally:
        server.kill()
        server.wait(timeout=5)


@needs_root
def test_pair_connects_through_capped_links_and_is_removed() -> None:
    before = set(list_namespaces())
    with VirtualNetwork(2, rate="20mbit", tag="t1") as net:
        made = set(net.existing())
        assert made == {*net.names, net.bridge_ns}
        assert "tbf" in net.qdiscs(0) and "20Mbit" in net.qdiscs(0)
        # 600 kB at 20 Mbit/s (2.5 MB/s) take >= 0.2 s even with a 64 KiB burst; an uncapped
        # veth moves them in a few milliseconds
        count, seconds = exchange(net, 600_000)
        assert count == 600_000
        assert 0.15 < seconds < 5.0
    assert not set(list_namespaces()) - before
    assert not (made & set(list_namespaces()))


@needs_root
def test_an_uncapped_pair_has_no_qdisc_and_is_fast() -> None:
    with VirtualNetwork(2, rate="none", tag="t5") as net:
        assert "tbf" not in net.qdiscs(0)
        count, seconds = exchange(net, 600_000)  # 0.24 s at 20 Mbit/s; here milliseconds
        assert count == 600_000 and seconds < 0.15
    with pytest.raises(NetnsError, match="delay needs a rate"), VirtualNetwork(
        2, rate="none", delay="1ms", tag="t6"
    ):
        pass


@needs_root
def test_removed_when_body_raises() -> None:
    net = VirtualNetwork(2, tag="t2")
    with pytest.raises(ZeroDivisionError), net:
        assert len(net.existing()) == 3
        _ = 1 / 0
    assert net.existing() == []
    net.close()  # idempotent


@needs_root
def test_removed_when_building_fails_half_way() -> None:
    net = VirtualNetwork(2, tag="t3", delay="1ms")
    try:
        with net:
            pass  # the kernel has netem: building succeeded, nothing to check here
    except NetnsError as err:
        assert "netem" in str(err)
    assert net.existing() == []


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="rate '100mb'"):
        VirtualNetwork(2, rate="100mb")
    with pytest.raises(ValueError, match="delay '1 ms'"):
        VirtualNetwork(2, delay="1 ms")
    with pytest.raises(ValueError, match="n=0"):
        VirtualNetwork(0)
    assert parse_rate("100mbit") == 100_000_000
    assert parse_rate("1gbit") == 10**9


def test_check_tools_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(NetnsError, match="apt-get install iproute2"):
        check_tools()
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsError, match="needs root"):
        check_tools()


@needs_root
def test_four_workers_distinct_addresses_and_removed() -> None:
    with VirtualNetwork(4, tag="t4") as net:
        assert len(net.existing()) == 5
        assert net.addresses == ["10.77.0.1", "10.77.0.2", "10.77.0.3", "10.77.0.4"]
        for i in range(4):
            assert "tbf" in net.qdiscs(i)
    assert net.existing() == []
