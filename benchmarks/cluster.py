"""Cluster: the control plane's ceiling across hosts (simulated ones, network namespaces).

The farm of tests/multihost/cluster.py: ``farm up --listen`` on a ``control`` host (Redis,
Postgres, SeaweedFS on its loopback, the TLS relay ``farm.local.tls_front`` on its address),
every other process on its own host and over TLS to it. Jobs are the ``sleep`` pipeline: a cpu
no-op, a gpu stage that only waits HOLD_MS (a model call of a realistic length that costs no
CPU), a cpu no-op; 3 broker messages per job.

- gpu hosts ``gpu1``..``gpu8``: one gpu worker each with ``FARM_GPU_BATCH=1``, i.e. one thread
  that holds one delivery at a time: "one gpu worker" renders one job at a time, as a GPU that
  does not batch. Ideal = gpu hosts / HOLD_MS (5 jobs/s per host at 200 ms);
- ``cpu``: one cpu worker (prefork, one child per core of this machine) for both cpu stages;
- ``client``: ``tests.multihost.probe round``, which submits a round of jobs at once, waits
  for them (a Postgres poll every 0.25 s) and reads Postgres ``xact_commit`` and Redis
  ``INFO commandstats`` before and after.

Rounds at 1, 2, 4 and 8 gpu hosts (workers added between rounds, the servers kept), REPEATS
of ideal x ROUND_S jobs each after a warm-up, the best of them reported (neighbours' load on a
shared machine only ever slows a round). jobs/s = jobs after the first WARMUP_SHARE finished /
time from that finish to the last (steady state: the submit burst and the ramp excluded).

CPU: this process (root namespace) reads every namespace's processes from /proc each
SAMPLE_S: on ``control`` by server (redis-server; postgres, postmaster and all its backends,
exited ones through the postmaster's reaped-children time; weed; the TLS relay), elsewhere by
host; and the machine's busy time. A round's CPU is interpolated to its window. Counters per
job: the window's delta less what an idle IDLE_S before the round showed per second (beats,
reconciler) and less the client's own polls.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.harness import Row, Skipped, _cpu
from tests.multihost import netns
from tests.multihost.cluster import Cluster

NAME = "cluster"
NEEDS_STACK = False  # the servers run on the control host, not on the local stack
HOLD_MS = 200
HOST_COUNTS = (1, 2, 4, 8)
GPU_HOSTS = tuple(f"gpu{i}" for i in range(1, max(HOST_COUNTS) + 1))
HOSTS = ("control", *GPU_HOSTS, "cpu", "client")
ROUND_S = 12  # jobs per round: ideal jobs/s x this
REPEATS = 2  # rounds per host count, back to back; the best counts (the least disturbed)
WARMUP_SHARE = 0.1
IDLE_S = 5
SAMPLE_S = 0.5
BENDS_BELOW = 0.9  # efficiency under which a host count counts as bent
SERVERS = ("redis-server", "postgres", "weed", "tls_front")
JOB = {"pipeline": "sleep", "hold_ms": HOLD_MS}
PARAMETERS = {
    "hold_ms": HOLD_MS,
    "gpu_hosts": list(HOST_COUNTS),
    "gpu_worker": "one per gpu host, FARM_GPU_BATCH=1: one delivery (job) at a time",
    "cpu_worker": "one, on host cpu, prefork with one child per core of this machine",
    "round_jobs": f"ideal jobs/s x {ROUND_S}",
    "repeats": f"{REPEATS} rounds per host count, the best counts",
    "warmup_share": WARMUP_SHARE,
    "idle_s": IDLE_S,
    "knobs": "production defaults (lease 30 s, reconciler every 15 s)",
    "pipeline": "sleep: take@cpu (noop) -> hold@gpu (sleeps hold_ms) -> give@cpu (noop)",
}


class CpuSampler(threading.Thread):
    """CPU seconds so far, by server on the control host and by host elsewhere, every
    SAMPLE_S; and the machine's busy seconds (all cores, whoever used them)."""

    def __init__(self, hosts: netns.Hosts) -> None:
        super().__init__(daemon=True, name="cpu-sampler")
        self.hosts = hosts
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._procs: dict[int, tuple[psutil.Process, str]] = {}
        self._inodes: dict[int, str] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(self.sample())
            self._halt.wait(SAMPLE_S)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def sample(self) -> tuple[float, dict[str, float]]:
        out: dict[str, float] = {}
        for pid, host in self._pids().items():
            label = self._label(host, pid)
            if label is not None:
                out[label] = out.get(label, 0.0) + _cpu(self._procs[pid][0])
        times = psutil.cpu_times()
        out["machine"] = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        return time.time(), out

    def _pids(self) -> dict[int, str]:
        """Every process of the hosts, by host: /proc read in this process (what ``ip netns
        pids`` does, without starting ``ip`` twice a second per host)."""
        if not self._inodes:
            self._inodes = {
                os.stat(f"/run/netns/{self.hosts.namespace(h)}").st_ino: h for h in self.hosts.names
            }
        out = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    host = self._inodes.get(os.stat(f"/proc/{entry.name}/ns/net").st_ino)
                except OSError:
                    continue
                if host is not None:
                    out[int(entry.name)] = host
        return out

    def _label(self, host: str, pid: int) -> str | None:
        known = self._procs.get(pid)
        if known is not None and known[0].is_running():
            return known[1]
        try:
            proc = psutil.Process(pid)
            label = host if host != "control" else _server(proc.name(), proc.cmdline())
        except psutil.Error:
            return None
        self._procs[pid] = (proc, label)
        return label

    def at(self, when: float) -> dict[str, float]:
        """CPU seconds by label at ``when``, linear between the samples around it."""
        times = [t for t, _ in self.samples]
        i = min(max(bisect.bisect_left(times, when), 1), len(times) - 1)
        (t0, a), (t1, b) = self.samples[i - 1], self.samples[i]
        w = 0.0 if t1 == t0 else min(max((when - t0) / (t1 - t0), 0.0), 1.0)
        return {k: a.get(k, 0.0) + w * (b[k] - a.get(k, 0.0)) for k in b}

    def between(self, start: float, end: float) -> dict[str, float]:
        a, b = self.at(start), self.at(end)
        return {k: b[k] - a.get(k, 0.0) for k in b}


def _server(name: str, cmdline: list[str]) -> str:
    if "tls_front" in " ".join(cmdline):
        return "tls_front"
    for server in ("redis-server", "postgres", "weed"):
        if name.startswith(server):
            return server
    return "control other"


def run(bench: object = None) -> dict:
    reason = netns.unavailable()
    if reason is not None:
        raise Skipped(reason)
    root = Path(tempfile.mkdtemp(prefix="farm-bench-cluster-"))
    failed = False
    try:
        with netns.Hosts(HOSTS) as hosts:
            cluster = Cluster(hosts, root, knobs={})
            cluster.start_servers()
            sampler = CpuSampler(hosts)
            sampler.start()
            try:
                return measure(cluster, sampler)
            finally:
                sampler.stop()
                cluster.stop_servers()
    except BaseException:
        failed = True
        print(f"cluster benchmark failed; logs kept under {root}")
        raise
    finally:
        if not failed:
            shutil.rmtree(root, ignore_errors=True)


def measure(cluster: Cluster, sampler: CpuSampler) -> dict:
    cpu = cluster.start_worker("cpu", "cpu")
    cluster.wait_ready([cpu], timeout=300)
    rounds, every, started = [], {}, 0
    for count in HOST_COUNTS:
        names = [
            cluster.start_worker(host, "gpu", extra={"FARM_GPU_BATCH": "1"})
            for host in GPU_HOSTS[started:count]
        ]
        cluster.wait_ready(names, timeout=300)
        started = count
        cluster.probe("round", str(2 * count), json.dumps(JOB))  # warm-up: connections, caches
        idle = idle_rates(cluster, sampler)
        jobs = int(count * 1000 / HOLD_MS * ROUND_S)
        tries = []
        for _ in range(REPEATS):
            answer = cluster.probe("round", str(jobs), json.dumps(JOB))
            tries.append(summarise_round(count, jobs, answer, idle, sampler))
        rounds.append(max(tries, key=lambda r: r["jobs_per_s"]))
        every[count] = [round(r["jobs_per_s"], 2) for r in tries]
        print(f"   {count} gpu hosts: {every[count]} jobs/s", flush=True)
    return {
        "parameters": PARAMETERS,
        "rounds": rounds,  # the best of each host count's
        "jobs_per_s_every_round": every,
        "bend": bend(rounds),
        "capacity_per_core": capacity(rounds[-1]),
        "rows": [row for r in rounds for row in rows(r)],
    }


def idle_rates(cluster: Cluster, sampler: CpuSampler) -> dict:
    """Per second, with the workers up and no jobs: commits, commands, CPU by label."""
    before = cluster.probe("counters")
    time.sleep(IDLE_S)
    after = cluster.probe("counters")
    seconds = after["at"] - before["at"]
    cpu = sampler.between(before["at"], after["at"])
    return {
        "seconds": round(seconds, 2),
        # each counters call is 1 transaction and 2 INFO commands of its own
        "pg_commits_per_s": (after["pg_commits"] - before["pg_commits"] - 1) / seconds,
        "redis_commands_per_s": (after["redis_commands"] - before["redis_commands"] - 2) / seconds,
        # the client's probes exit between samples: no CPU of theirs is counted here
        "cpu_util": {k: round(v / seconds, 4) for k, v in cpu.items() if k != "client"},
    }


def summarise_round(count: int, jobs: int, answer: dict, idle: dict, sampler: CpuSampler) -> dict:
    finished, submitted = answer["finished"], answer["submitted"]
    warm = max(1, int(jobs * WARMUP_SHARE))
    steady = (jobs - warm) / (finished[-1] - finished[warm - 1])
    ideal = count * 1000 / HOLD_MS
    start, end = submitted[0], finished[-1]
    wall = end - start
    cpu = sampler.between(start, end)
    before, after = answer["before"], answer["after"]
    window = after["at"] - before["at"]
    commits = after["pg_commits"] - before["pg_commits"] - answer["polls"] - 1
    commands = after["redis_commands"] - before["redis_commands"] - 2
    by_command = {
        name: calls - before["redis_by_command"].get(name, 0)
        for name, calls in after["redis_by_command"].items()
    }
    top = sorted(by_command.items(), key=lambda item: -item[1])[:12]
    servers = {k: round(cpu.get(k, 0.0) / wall, 3) for k in SERVERS}
    return {
        "gpu_hosts": count,
        "jobs": jobs,
        "statuses": answer["statuses"],
        "submit_s": round(submitted[-1] - start, 2),
        "wall_s": round(wall, 2),
        "jobs_per_s": steady,
        "jobs_per_s_submit_to_last": jobs / wall,
        "ideal_jobs_per_s": ideal,
        "efficiency": steady / ideal,
        # the time each gpu worker spent per job: hold_ms plus its delivery's own work
        "gpu_worker_ms_per_job": 1000 * count / steady,
        "server_cpu_util": servers,  # CPU seconds / wall seconds: 1.0 = one core busy
        "host_cpu_util": {
            k: round(v / wall, 3) for k, v in cpu.items() if k in (*GPU_HOSTS, "cpu", "client")
        },
        "control_other_cpu_util": round(cpu.get("control other", 0.0) / wall, 3),
        "machine_busy_cores": round(cpu["machine"] / wall, 3),
        "machine_cores": psutil.cpu_count(),
        "farm_busy_cores": round(sum(v for k, v in cpu.items() if k != "machine") / wall, 3),
        "server_cpu_ms_per_job": {k: round(1000 * cpu.get(k, 0.0) / jobs, 2) for k in SERVERS},
        "host_cpu_ms_per_job": {
            k: round(1000 * v / jobs, 2) for k, v in cpu.items() if k in (*GPU_HOSTS, "cpu")
        },
        "pg_commits_per_job": (commits - idle["pg_commits_per_s"] * window) / jobs,
        "pg_commits_per_job_raw": commits / jobs,
        "pg_rollbacks_per_job": (after["pg_rollbacks"] - before["pg_rollbacks"]) / jobs,
        "redis_commands_per_job": (commands - idle["redis_commands_per_s"] * window) / jobs,
        "redis_commands_per_job_raw": commands / jobs,
        "redis_top_commands_per_job": {name: round(calls / jobs, 2) for name, calls in top},
        "client_polls": answer["polls"],
        "idle": idle,
    }


def bend(rounds: list[dict]) -> dict:
    """Scaling against the first round (jobs/s per gpu host there, times the hosts): the first
    host count under BENDS_BELOW, and what was busiest there."""
    per_host = rounds[0]["jobs_per_s"] / rounds[0]["gpu_hosts"]
    for r in rounds:
        r["scaling_vs_first"] = r["jobs_per_s"] / (per_host * r["gpu_hosts"])
    bent = next((r for r in rounds if r["scaling_vs_first"] < BENDS_BELOW), None)
    if bent is None:
        return {"at_gpu_hosts": None, "note": f"scaling >= {BENDS_BELOW} at every host count"}
    busiest = max(bent["server_cpu_util"].items(), key=lambda item: item[1])
    return {
        "at_gpu_hosts": bent["gpu_hosts"],
        "scaling_vs_first": bent["scaling_vs_first"],
        "efficiency": bent["efficiency"],
        "machine_busy_cores": bent["machine_busy_cores"],
        "farm_busy_cores": bent["farm_busy_cores"],
        "machine_cores": bent["machine_cores"],
        "busiest_server": busiest[0],
        "busiest_server_cpu_util": busiest[1],
    }


def capacity(r: dict) -> dict:
    """Jobs/s one core of each server would carry at the CPU per job measured in ``r``."""
    return {
        k: round(1000 / ms, 1) if ms > 0 else None for k, ms in r["server_cpu_ms_per_job"].items()
    }


def rows(r: dict) -> list[Row]:
    n = r["gpu_hosts"]
    jobs = Row(NAME, f"{n} gpu hosts jobs/s (vs ideal)", r["jobs_per_s"],
               r["ideal_jobs_per_s"], r["efficiency"], "info", None)  # fmt: skip
    busy = Row(NAME, f"{n} gpu hosts machine busy cores", r["machine_busy_cores"], None, None,
               "info", None)  # fmt: skip
    return [jobs, busy]
