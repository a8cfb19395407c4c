"""The network-namespace harness: hosts are made and removed, reach each other and nothing
else, can be cut off and killed, and crashed runs' leftovers are swept."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.multihost import netns
from tests.multihost.netns import Hosts

ROOT = Path(__file__).resolve().parents[2]
PORT = 8000  # every host has its own port space: no clash with anything outside

# Answers each connection with its argument.
SERVER = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[2])))
while True:
    conn, _ = server.accept()
    conn.sendall(sys.argv[1].encode())
    conn.close()
"""
# Prints what the server said, or the errno's name (TimeoutError for a timeout); retries for
# argv[3] seconds, so that a server still starting is waited for.
CLIENT = """
import errno, socket, sys, time
deadline = time.monotonic() + float(sys.argv[3])
while True:
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as conn:
            print(conn.recv(64).decode())
            break
    except OSError as exc:
        if time.monotonic() >= deadline:
            print(errno.errorcode.get(exc.errno or 0, type(exc).__name__))
            break
        time.sleep(0.05)
"""


def serve(hosts: Hosts, name: str) -> None:
    hosts.spawn(name, [sys.executable, "-c", SERVER, f"hello from {name}", str(PORT)])


def connect(hosts: Hosts, name: str, address: str, wait: float = 0) -> str:
    """What a client in host ``name`` gets from ``address``."""
    args = [sys.executable, "-c", CLIENT, address, str(PORT), str(wait)]
    done = hosts.run(name, args, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def ours(prefix: str) -> list[str]:
    return [ns for ns in netns._namespaces() if ns.startswith(f"{prefix}-")]


def test_namespaces_are_made_and_removed_even_when_the_body_raises(needs_netns):
    with pytest.raises(RuntimeError, match="body failed"), Hosts(("a", "b")) as hosts:
        assert sorted(ours(hosts.prefix)) == sorted(
            [hosts.namespace("a"), hosts.namespace("b"), f"{hosts.prefix}-fabric"]
        )
        sleeper = hosts.spawn("a", ["sleep", "60"])
        assert hosts.pids("a") == [sleeper.pid]
        raise RuntimeError("body failed")
    assert ours(hosts.prefix) == []
    assert sleeper.returncode == -9
    assert not (netns.STATE_DIR / f"{hosts.prefix}.json").exists()


def test_a_host_reaches_another_at_its_address_and_itself_on_loopback(needs_netns):
    with Hosts(("a", "b")) as hosts:
        assert all(ip_address(hosts.address(name)) in netns.NETWORK for name in hosts.names)
        serve(hosts, "a")
        assert connect(hosts, "b", hosts.address("a"), wait=10) == "hello from a"
        assert connect(hosts, "a", "127.0.0.1") == "hello from a"
        assert connect(hosts, "b", "127.0.0.1") == "ECONNREFUSED"  # b's own loopback
        # A second instance at the same time: other names, another /24, no way across.
        with Hosts(("a",)) as other:
            assert other.prefix != hosts.prefix
            assert other.address("a").rsplit(".", 1)[0] != hosts.address("a").rsplit(".", 1)[0]
            assert connect(other, "a", hosts.address("a")) == "ENETUNREACH"


def test_hosts_have_no_route_out_and_no_link_to_the_root_namespace(needs_netns):
    with Hosts(("a", "b")) as hosts:
        # Nothing is sent: without a route the kernel refuses at connect().
        assert connect(hosts, "a", "192.0.2.1") == "ENETUNREACH"
        subnet = f"{hosts.address('a').rsplit('.', 1)[0]}.0/24"
        for name in hosts.names:
            ns = hosts.namespace(name)
            routes = json.loads(netns._ip("-n", ns, "-j", "route", "show", "table", "all"))
            assert {r["dst"] for r in routes if r.get("table") != "local"} == {subnet}, routes
            addresses = json.loads(netns._ip("-n", ns, "-j", "-4", "address"))
            assert {a["local"] for i in addresses for a in i["addr_info"]} == {
                "127.0.0.1",
                hosts.address(name),
            }
        # Every veth's other end is in a namespace of this instance, never in the root one
        # (whose interfaces have no name in `ip netns`), so the root namespace cannot reach in.
        mine = {hosts.namespace(name) for name in hosts.names} | {f"{hosts.prefix}-fabric"}
        for ns in mine:
            names = {
                i["nsid"]: i.get("name")
                for i in json.loads(netns._ip("-n", ns, "-j", "netns", "list-id"))
            }
            links = json.loads(netns._ip("-n", ns, "-j", "link", "show"))
            peers = [names.get(link["link_netnsid"]) for link in links if "link_netnsid" in link]
            assert peers and set(peers) <= mine, (ns, peers)
        fabric = json.loads(netns._ip("-n", f"{hosts.prefix}-fabric", "-j", "-4", "address"))
        assert [a for i in fabric for a in i["addr_info"]] == []


def test_link_down_cuts_a_host_off_and_link_up_restores_it(needs_netns):
    with Hosts(("a", "b")) as hosts:
        serve(hosts, "a")
        assert connect(hosts, "b", hosts.address("a"), wait=10) == "hello from a"
        hosts.link_down("a")
        assert connect(hosts, "b", hosts.address("a")) in ("TimeoutError", "EHOSTUNREACH")
        assert connect(hosts, "a", hosts.address("b")) == "ENETUNREACH"
        assert connect(hosts, "a", "127.0.0.1") == "hello from a"
        hosts.link_up("a")
        assert connect(hosts, "b", hosts.address("a"), wait=10) == "hello from a"


def test_kill_host_leaves_no_process(needs_netns):
    with Hosts(("a", "b")) as hosts:
        # A child that left the spawned process's session is killed too.
        forked = hosts.spawn("a", ["sh", "-c", "setsid sleep 60 & exec sleep 60"])
        other = hosts.spawn("b", ["sleep", "60"])
        wait_until(lambda: len(hosts.pids("a")) == 2, 10, "both sleeps to start")
        hosts.kill_host("a")
        assert hosts.pids("a") == []
        assert forked.returncode == -9
        assert hosts.pids("b") == [other.pid]
        serve(hosts, "a")  # the host can be used again, as a rebooted machine
        assert connect(hosts, "b", hosts.address("a"), wait=10) == "hello from a"


# A harness whose creator dies with a process still running in one of its hosts.
CRASH = """
import os
from tests.multihost.netns import Hosts
hosts = Hosts(["a"]).__enter__()
hosts.spawn("a", ["sleep", "60"])
print(hosts.prefix, flush=True)
os.kill(os.getpid(), 9)
"""


def test_leftovers_of_a_dead_creator_are_swept_and_live_ones_kept(needs_netns):
    crash = subprocess.run(
        [sys.executable, "-c", CRASH], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert crash.returncode == -9, crash.stderr
    dead = crash.stdout.strip()
    assert len(ours(dead)) == 2
    left = [int(p) for p in netns._ip("netns", "pids", f"{dead}-a").split()]
    assert len(left) == 1
    with Hosts(["a"]) as live:  # entering sweeps
        assert ours(dead) == []
        wait_until(lambda: netns._started(left[0]) is None, 10, "the leftover process to die")
        assert not (netns.STATE_DIR / f"{dead}.json").exists()
        netns.sweep()
        assert len(ours(live.prefix)) == 2


def test_unavailable_gives_a_one_line_reason_and_require_skips(monkeypatch, tmp_path):
    # An `ip` whose `netns add` fails as in an unprivileged container; all else works.
    failing_ip = tmp_path / "ip"
    failing_ip.write_text(
        '#!/bin/sh\nif [ "$1 $2" = "netns add" ]; then\n'
        "  echo 'mount --make-shared /run/netns failed: Operation not permitted' >&2\n"
        "  echo 'second line' >&2; exit 1\nfi\n"
        f'exec {netns.IP} "$@"\n'
    )
    failing_ip.chmod(0o755)
    cases = [
        ("/nonexistent/ip", "no /nonexistent/ip binary (iproute2)"),
        (str(failing_ip), "ip netns add failed: mount --make-shared /run/netns failed"),
    ]
    try:
        for ip, reason in cases:
            with monkeypatch.context() as m:
                m.setattr(netns, "IP", ip)
                # The same outcome as root and as anyone else.
                m.setattr(netns.os, "geteuid", lambda: 0)
                m.setattr(netns, "STATE_DIR", tmp_path / "state")
                netns.unavailable.cache_clear()
                assert netns.unavailable().startswith(reason)
                assert "\n" not in netns.unavailable()
                with pytest.raises(pytest.skip.Exception, match=re.escape(reason)):
                    netns.require()
        with monkeypatch.context() as m:
            m.setattr(netns.os, "geteuid", lambda: 1000)
            netns.unavailable.cache_clear()
            assert netns.unavailable() == "network namespaces need root (running as uid 1000)"
    finally:
        netns.unavailable.cache_clear()
