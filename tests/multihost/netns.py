"""Several simulated machines on one Linux box: one network namespace per host.

Each host is a namespace ``fm<6 hex>-<name>`` with ``lo`` up and one veth end ``eth0`` holding
an address in a /24 of 198.18.0.0/15 (RFC 2544's benchmarking range, never routed on the
internet), picked at random per instance. The other veth ends hang on a bridge in a namespace
of the harness's own, ``fm<6 hex>-fabric``. No namespace has a default route and no link
reaches the root namespace, so a process in a host can reach only its own loopback and the
other hosts of the same instance.

    with Hosts(("control", "gpu1", "client")) as hosts:
        hosts.spawn("control", [sys.executable, "-m", "http.server", "8000"], None, log)
        hosts.run("client", ["curl", f"http://{hosts.address('control')}:8000/"])

On exit every process left in the namespaces is SIGKILLed and the namespaces are deleted. A
run that crashed leaves its namespaces behind; the next instance (or ``sweep()``) removes them,
because each instance records its creator (pid and start time) under ``STATE_DIR``.

Needs root and ``ip`` (iproute2); ``unavailable()`` says in one line why not, where not.
"""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import json
import os
import random
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

IP = "/usr/sbin/ip"
# /run is a tmpfs, like /run/netns: both are gone after a reboot, so they cannot disagree.
STATE_DIR = Path("/run/farm-netns")
NETWORK = ipaddress.ip_network("198.18.0.0/15")
DEVICE = "eth0"  # each host's veth end, inside its namespace
_OURS = re.compile(r"(fm[0-9a-f]{6})-")  # an instance's prefix, in its namespaces' names
_HOST_NAME = re.compile(r"[a-z0-9_]{1,20}")


def _ip(*args: str, input: str | None = None, check: bool = True) -> str:
    done = subprocess.run([IP, *args], input=input, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _batch(lines: Sequence[str], *options: str, check: bool = True) -> None:
    """Many ``ip`` commands in one process (``-n NS`` applies to all of them)."""
    _ip(*options, "-batch", "-", input="".join(f"{line}\n" for line in lines), check=check)


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _pids(namespace: str) -> list[int]:
    return [int(pid) for pid in _ip("netns", "pids", namespace).split()]


def _kill(namespace: str, timeout: float = 10) -> None:
    """SIGKILL every process in the namespace until none is left (they may fork meanwhile)."""
    deadline = time.monotonic() + timeout
    while pids := _pids(namespace):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in {namespace} survive SIGKILL")
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _remove(namespaces: Sequence[str]) -> None:
    # Deleting a namespace only unmounts its name: processes inside would live on, unreachable.
    try:
        for namespace in namespaces:
            _kill(namespace)
    finally:
        _batch([f"netns del {ns}" for ns in namespaces], "-force", check=False)


def _started(pid: int) -> str | None:
    """The process's start time (tells it from a later process with the same pid), or None
    when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]  # state, starttime (stat fields 3 and 22)


@contextmanager
def _locked() -> Iterator[None]:
    """Sweeping and claiming exclude each other across processes."""
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _sweep() -> dict[str, dict]:
    """Remove what dead creators left; returns the live instances' states by prefix."""
    live: dict[str, dict] = {}
    for path in STATE_DIR.glob("fm*.json"):
        with suppress(ValueError, KeyError):
            state = json.loads(path.read_text())
            if _started(state["pid"]) == state["start"]:
                live[path.stem] = state
    # A namespace of ours without a live state file is a leftover: claims are written first.
    _remove([ns for ns in _namespaces() if (m := _OURS.match(ns)) and m[1] not in live])
    for path in STATE_DIR.glob("fm*.json"):
        if path.stem not in live:
            path.unlink(missing_ok=True)
    return live


def sweep() -> None:
    """Delete the namespaces (killing their processes) of instances whose creator is dead."""
    with _locked():
        _sweep()


def _claim() -> tuple[str, ipaddress.IPv4Network]:
    """A fresh prefix and a /24 no live instance uses, recorded as ours."""
    with _locked():
        live = _sweep()
        used = {state["net"] for state in live.values()}
        net = random.choice([n for n in NETWORK.subnets(new_prefix=24) if str(n) not in used])
        prefix = "fm" + secrets.token_hex(3)
        while prefix in live or any(ns.startswith(prefix) for ns in _namespaces()):
            prefix = "fm" + secrets.token_hex(3)
        state = {"pid": os.getpid(), "start": _started(os.getpid()), "net": str(net)}
        (STATE_DIR / f"{prefix}.json").write_text(json.dumps(state))
    return prefix, net


def _release(prefix: str) -> None:
    (STATE_DIR / f"{prefix}.json").unlink(missing_ok=True)


@functools.cache
def unavailable() -> str | None:
    """Why namespaces cannot be made here, in one line; None when they can (tried once, by
    creating and deleting a throwaway namespace)."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    if not os.access(IP, os.X_OK):
        return f"no {IP} binary (iproute2)"
    try:
        prefix, _ = _claim()
    except (OSError, RuntimeError) as exc:
        return f"cannot record harness state in {STATE_DIR}: {exc}".splitlines()[0]
    try:
        added = subprocess.run([IP, "netns", "add", f"{prefix}-probe"], capture_output=True)
        if added.returncode != 0:
            why = added.stderr.decode(errors="replace").strip().splitlines() or ["no message"]
            return f"ip netns add failed: {why[0]}"
        _ip("netns", "del", f"{prefix}-probe")
    finally:
        _release(prefix)
    return None


def require() -> None:
    """Skip the calling pytest test, with the reason, where namespaces cannot be made."""
    reason = unavailable()
    if reason is not None:
        import pytest  # only here: benchmarks import this module without pytest

        pytest.skip(reason)


class Hosts:
    """Simulated hosts, one network namespace each, on one bridge; a context manager."""

    def __init__(self, names: Sequence[str]) -> None:
        names = tuple(names)
        if not names or len(set(names)) != len(names) or "fabric" in names:
            raise ValueError(f"host names must be distinct and not 'fabric': {names}")
        if not all(_HOST_NAME.fullmatch(name) for name in names):
            raise ValueError(f"host names are [a-z0-9_]{{1,20}}: {names}")
        self.names = names
        self.prefix = ""
        self._net: ipaddress.IPv4Network | None = None
        self._spawned: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> Hosts:
        self.prefix, self._net = _claim()
        try:
            self._build()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._teardown()

    def _build(self) -> None:
        fabric = f"{self.prefix}-fabric"
        _batch([f"netns add {ns}" for ns in (fabric, *map(self.namespace, self.names))])
        # addrgenmode none: no IPv6 link-local addresses, so the hosts hold their 198.18
        # address and loopback only.
        lines = ["link add br0 type bridge", "link set br0 addrgenmode none", "link set br0 up"]
        for i, name in enumerate(self.names):
            lines += [
                f"link add h{i} type veth peer name {DEVICE} netns {self.namespace(name)}",
                f"link set h{i} addrgenmode none",
                f"link set h{i} master br0",
                f"link set h{i} up",
            ]
        _batch(lines, "-n", fabric)
        for name in self.names:
            host = [
                "link set lo up",
                f"link set {DEVICE} addrgenmode none",
                f"address add {self.address(name)}/24 dev {DEVICE}",
                f"link set {DEVICE} up",
            ]
            _batch(host, "-n", self.namespace(name))

    def _teardown(self) -> None:
        try:
            mine = [f"{self.prefix}-fabric", *map(self.namespace, self.names)]
            _remove([ns for ns in mine if ns in _namespaces()])
            self._reap()
        finally:
            _release(self.prefix)

    def _reap(self, host: str | None = None) -> None:
        """Collect our killed children, so that they leave no zombies."""
        for name, process in self._spawned:
            if host in (None, name):
                with suppress(subprocess.TimeoutExpired):
                    process.wait(5)
        self._spawned = [(n, p) for n, p in self._spawned if p.returncode is None]

    def namespace(self, name: str) -> str:
        if name not in self.names:
            raise KeyError(f"no host {name!r} among {self.names}")
        return f"{self.prefix}-{name}"

    def address(self, name: str) -> str:
        """The host's IPv4 address, in this instance's /24 of 198.18.0.0/15."""
        assert self._net is not None, "use Hosts as a context manager"
        return str(self._net[self.names.index(name) + 1])

    def command(self, name: str, args: Sequence[str]) -> list[str]:
        """``args`` run inside the host (its children stay there too)."""
        return [IP, "netns", "exec", self.namespace(name), *args]

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike = os.devnull,
    ) -> subprocess.Popen:
        """Start ``args`` in the host, in a session of its own, stdout and stderr to
        ``log_path``; ``env`` is the whole environment (None: this process's)."""
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                self.command(name, args),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._spawned.append((name, process))
        return process

    def run(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` in the host to the end; output captured as text, never checked."""
        return subprocess.run(
            self.command(name, args), env=env, capture_output=True, text=True, timeout=timeout
        )

    def link_down(self, name: str) -> None:
        """Cut the host off the others (its loopback keeps working): its veth end goes down."""
        _ip("-n", self.namespace(name), "link", "set", DEVICE, "down")

    def link_up(self, name: str) -> None:
        """Undo ``link_down``: the address stays on the device, so its route comes back."""
        _ip("-n", self.namespace(name), "link", "set", DEVICE, "up")

    def kill_host(self, name: str) -> None:
        """SIGKILL every process in the host, as if the machine died; it may be used again."""
        _kill(self.namespace(name))
        self._reap(name)

    def pids(self, name: str) -> list[int]:
        return _pids(self.namespace(name))
