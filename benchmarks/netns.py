"""A private, bandwidth-capped network of Linux network namespaces for the speed benchmark.

:class:`VirtualNetwork` builds, for ``n`` workers::

    gzn<pid>-w0  eth0 10.77.0.1/24 --veth-- v0 ┐
    gzn<pid>-w1  eth0 10.77.0.2/24 --veth-- v1 ┼ br0 (bridge) in namespace gzn<pid>-br
    ...                                        ┘

Every address lives only inside namespaces made here; the root namespace gets no interface,
no address and no route. Each veth pair is capped in both directions with a token bucket
(``tc qdisc ... tbf rate RATE``: the worker's ``eth0`` caps what it sends, the bridge end
``v<i>`` what it receives), like a full-duplex link of that rate. ``delay`` adds a netem delay
on the worker's egress (once per direction: the round trip between two workers gets twice it).

Namespace names start with ``gzn<pid>-`` (the pid of the creating process), so
:func:`cleanup_leftovers` can remove what a killed run left behind without touching a live
run's network. Needs root and iproute2 (``ip``, ``tc``); :func:`check_tools` says what is
missing and how to fix it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType

__all__ = [
    "PREFIX",
    "NetnsError",
    "VirtualNetwork",
    "check_tools",
    "cleanup_leftovers",
    "list_namespaces",
    "parse_rate",
]

#: first characters of every namespace this module creates
PREFIX = "gzn"
_NAME = re.compile(rf"^{PREFIX}(\d+)-")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$", re.IGNORECASE)
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_DELAY = re.compile(r"^\d+(?:\.\d+)?(us|ms|s)$")


class NetnsError(RuntimeError):
    """The network cannot be built here; the message says why and what to do."""


def parse_rate(rate: str) -> int:
    """Bits per second of a tc rate such as ``"100mbit"`` or ``"1gbit"``."""
    match = _RATE.match(rate.strip())
    if not match:
        raise ValueError(f"rate {rate!r} is not a tc rate; expected e.g. 100mbit, 1gbit, 500kbit")
    bits = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if bits < 8000:
        raise ValueError(f"rate {rate!r} is below 8kbit; expected a usable link rate")
    return int(bits)


def check_tools() -> None:
    """Raise :class:`NetnsError` unless running as root with ``ip`` and ``tc`` on the PATH."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetnsError(
            f"{' and '.join(missing)} not found on the PATH: the network benchmark needs "
            "iproute2 (`apt-get install iproute2`)"
        )
    if os.geteuid() != 0:
        raise NetnsError(
            "creating network namespaces, veth links and tc qdiscs needs root (CAP_NET_ADMIN "
            f"and CAP_SYS_ADMIN); this process runs as uid {os.geteuid()}. Run it with sudo."
        )


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (or ``tc`` when the first arg is "tc"); raise NetnsError on failure."""
    cmd = list(args) if args[0] == "tc" else ["ip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_leftovers() -> list[str]:
    """Delete namespaces of this module whose creating process is gone; return their names."""
    removed = []
    for name in list_namespaces():
        match = _NAME.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    return removed


class VirtualNetwork:
    """``n`` worker namespaces joined through a bridge namespace, each link capped at ``rate``.

    A context manager: the network exists inside ``with``, and is removed on exit whatever
    happened (also when building it failed half-way). ``close()`` is idempotent.
    """

    def __init__(
        self,
        n: int,
        rate: str = "100mbit",
        delay: str | None = None,
        subnet: str = "10.77.0.0/24",
        tag: str = "",
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 200:
            raise ValueError(f"n={n!r}; expected an int from 1 to 200 workers")
        #: "none": no rate limit (the veth links' own speed, a few Gbit/s of the CPU's)
        self.rate_bits = 0 if rate == "none" else parse_rate(rate)
        if delay is not None and not _DELAY.match(delay):
            raise ValueError(f"delay {delay!r} is not a tc time; expected e.g. 1ms, 500us")
        if not re.fullmatch(r"[a-z0-9]{0,6}", tag):
            raise ValueError(f"tag {tag!r}: expected up to 6 lowercase letters or digits")
        net = ipaddress.ip_network(subnet)
        if net.num_addresses < n + 2:
            raise ValueError(f"subnet {subnet} has too few addresses for {n} workers")
        self.n, self.rate, self.delay, self.net = n, rate, delay, net
        self.prefix = f"{PREFIX}{os.getpid()}{tag}-"
        self.bridge_ns = f"{self.prefix}br"
        self.names = [f"{self.prefix}w{i}" for i in range(n)]
        self.addresses = [str(net.network_address + 1 + i) for i in range(n)]
        self._created: list[str] = []

    # building ------------------------------------------------------------------------------

    def open(self) -> VirtualNetwork:
        """Build the namespaces, links, addresses and qdiscs (removing all on failure)."""
        check_tools()
        cleanup_leftovers()
        try:
            self._add_ns(self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                self._add_worker(i, name)
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _add_worker(self, i: int, name: str) -> None:
        self._add_ns(name)
        host = f"v{i}"
        _ip("-n", self.bridge_ns, "link", "add", host, "type", "veth", "peer", "name", "eth0",
            "netns", name)  # fmt: skip
        _ip("-n", self.bridge_ns, "link", "set", host, "master", "br0", "up")
        _ip("-n", name, "addr", "add", f"{self.addresses[i]}/{self.net.prefixlen}", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        self._shape(name, "eth0", self.delay)
        self._shape(self.bridge_ns, host, None)

    def _tbf(self) -> list[str]:
        # burst: at least 64 KiB (a GSO super-packet) or 2 ms at the rate; queue of 50 ms
        burst = max(64 * 1024, self.rate_bits // 8 // 500)
        return ["tbf", "rate", self.rate, "burst", str(burst), "latency", "50ms"]

    def _shape(self, ns: str, dev: str, delay: str | None) -> None:
        if not self.rate_bits and delay is None:
            return  # uncapped
        if not self.rate_bits:
            raise NetnsError("a delay needs a rate as well (tbf under netem)")
        if delay is None:
            _ip("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", *self._tbf())
            return
        proc = _ip("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                   "delay", delay, check=False)  # fmt: skip
        if proc.returncode != 0:
            raise NetnsError(
                f"cannot add a {delay} delay: `tc qdisc add ... netem` failed "
                f"({proc.stderr.strip()}). The running kernel ({os.uname().release}) needs the "
                "netem qdisc (CONFIG_NET_SCH_NETEM, module sch_netem); run without --delay or "
                "on a kernel that has it"
            )
        _ip("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
            *self._tbf())  # fmt: skip

    # using -------------------------------------------------------------------------------

    def exec_prefix(self, i: int) -> list[str]:
        """The argv prefix that runs a command inside worker ``i``'s namespace."""
        return ["ip", "netns", "exec", self.names[i]]

    def qdiscs(self, i: int) -> str:
        """``tc qdisc show`` of worker ``i``'s ``eth0`` (for checks and logs)."""
        return _ip("tc", "-n", self.names[i], "qdisc", "show", "dev", "eth0").stdout

    # removing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Delete every namespace this network made (their veths and bridge go with them)."""
        errors = []
        for name in reversed(self._created):
            proc = _ip("netns", "delete", name, check=False)
            if proc.returncode != 0 and name in list_namespaces():
                errors.append(f"{name}: {proc.stderr.strip()}")
        self._created.clear()
        if errors:
            raise NetnsError("could not delete namespaces: " + "; ".join(errors))

    def existing(self) -> Sequence[str]:
        """Namespaces of this network that exist right now."""
        return [name for name in list_namespaces() if name.startswith(self.prefix)]

    def __enter__(self) -> VirtualNetwork:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
