"""The farm on five simulated hosts, TLS on every connection: servers on ``control``, gpu
workers on ``gpu1`` and ``gpu2``, a cpu worker on ``cpu``, and a ``client`` that submits.
Then faults between hosts: a gpu host's link cut mid-denoise, the control host partitioned
from everyone for 20 s, a whole host killed. After each the invariants of the one-host fault
suite hold: every job done, one done record per stage, outputs as a fault-free run's, no
orphans after `farm gc`."""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm.pipelines import get_pipeline
from tests.helpers import same_render, wait_until
from tests.multihost import netns
from tests.multihost.cluster import FARM, HOSTS, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("needs_netns")]

PARAMS = {"size": 64, "steps": 12, "strength": 0.8, "prompt": "a windmill", "seed": 21}
SLOW = {**PARAMS, "steps": 80, "strength": 1.0}  # seconds of denoise to cut into
GPU_HOSTS = ("gpu1", "gpu2")
PAGES = ((8686, "workers"), (9460, "metrics"), (5555, "workers"))  # ui, metrics, Flower


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    netns.require()
    root = tmp_path_factory.mktemp("cluster")
    with netns.Hosts(HOSTS) as hosts:
        cluster = Cluster(hosts, root)
        cluster.start_servers()
        try:
            names = [cluster.start_worker(host, "gpu") for host in GPU_HOSTS]
            names.append(cluster.start_worker("cpu", "cpu", queues=("cpu", "audio")))
            cluster.wait_ready(names)
            yield cluster
        finally:
            cluster.stop_servers()


@pytest.fixture(scope="module")
def references(cluster: Cluster) -> dict[tuple[int, str], bytes]:
    """Fault-free outputs, by (hue, params name), rendered on the cluster itself."""
    out = {}
    for name, params in (("params", PARAMS), ("slow", SLOW)):
        (job_id,) = cluster.probe("submit", "1", json.dumps(params), "90")
        out[(90, name)] = output(check_done(cluster, [job_id])[job_id])
    return out


def check_done(cluster: Cluster, job_ids: list[str]) -> dict[str, dict]:
    """Every job done with one done record per stage and no object beyond its records."""
    report = cluster.probe("report", *job_ids)
    for job in report.values():
        assert job["status"] == "done", job["error"]
        names = [s["name"] for s in job["stages"]]
        assert names == [s.name for s in get_pipeline("img2img").stages]
        assert all(s["status"] == "done" for s in job["stages"])
        assert job["extra_objects"] == []
    return report


def output(job: dict) -> bytes:
    return base64.b64decode(job["output"])


def host_of(worker: str | None) -> str | None:
    return worker.rsplit("@", 1)[1] if worker else None


def stage_record(cluster: Cluster, job_id: str, stage: str) -> dict:
    return cluster.probe("stage", job_id, stage)


def assert_no_orphans(cluster: Cluster) -> None:
    swept = cluster.probe("gc")
    assert swept["orphaned_jobs"] == [] and swept["orphaned_packs"] == []
    assert swept["incomplete_uploads"] == 0


def denoise_running_on(cluster: Cluster, job_id: str) -> str:
    """Wait until the job's denoise runs; the gpu host it runs on."""
    record: dict = {}

    def running() -> bool:
        record.update(stage_record(cluster, job_id, "denoise"))
        return record["status"] == "running"

    wait_until(running, timeout=120, what="denoise running")
    return host_of(record["worker"])


def test_jobs_render_across_hosts_over_tls(cluster: Cluster, references) -> None:
    job_ids = cluster.probe("submit", "4", json.dumps(PARAMS), "90")
    report = check_done(cluster, job_ids)
    assert same_render(output(report[job_ids[0]]), references[(90, "params")])
    for job in report.values():
        for stage in job["stages"]:
            expected = "cpu" if stage["queue"] == "cpu" else GPU_HOSTS
            assert host_of(stage["worker"]) in expected, stage
    assert all(url.split("://")[0] in ("rediss",) for url in (cluster.env["FARM_BROKER_URL"],))
    assert "sslmode=verify-full" in cluster.env["FARM_DATABASE_URL"]
    assert cluster.env["FARM_S3_ENDPOINT"].startswith("https://")


def test_gpu_host_cut_off_mid_denoise(cluster: Cluster, references) -> None:
    """Its lease runs out, the reconciler sends the stage again, the other gpu host finishes
    it; the cut host's late commit, once it is back, is fenced out."""
    (job_id,) = cluster.probe("submit", "1", json.dumps(SLOW), "90")
    cut = denoise_running_on(cluster, job_id)
    other = next(h for h in GPU_HOSTS if h != cut)
    cluster.hosts.link_down(cut)
    try:
        wait_until(
            lambda: host_of(stage_record(cluster, job_id, "denoise")["worker"]) == other,
            timeout=120,
            what=f"denoise taken over by {other}",
        )
        time.sleep(5)  # well past FARM_LEASE_TTL (4 s) with the link still down
    finally:
        cluster.hosts.link_up(cut)
    job = check_done(cluster, [job_id])[job_id]
    denoise = next(s for s in job["stages"] if s["name"] == "denoise")
    assert host_of(denoise["worker"]) == other and denoise["attempts"] >= 2
    assert same_render(output(job), references[(90, "slow")])
    log = cluster.root / "logs" / f"{cut}-gpu.log"
    wait_until(lambda: "took over this stage" in log.read_text(), timeout=120, what="fenced")
    assert_no_orphans(cluster)


def test_control_host_partitioned_for_twenty_seconds(cluster: Cluster, references) -> None:
    job_ids = cluster.probe("submit", "4", json.dumps(PARAMS), "90")
    cluster.hosts.link_down("control")
    time.sleep(20)
    cluster.hosts.link_up("control")
    report = check_done(cluster, job_ids)
    assert same_render(output(report[job_ids[0]]), references[(90, "params")])
    assert_no_orphans(cluster)


def test_gpu_host_killed_mid_denoise(cluster: Cluster, references) -> None:
    """All its processes die at once; the reconciler (on the other hosts' workers) sends its
    stage again. The host then comes back with a new worker."""
    (job_id,) = cluster.probe("submit", "1", json.dumps(SLOW), "90")
    dead = denoise_running_on(cluster, job_id)
    cluster.hosts.kill_host(dead)
    job = check_done(cluster, [job_id])[job_id]
    denoise = next(s for s in job["stages"] if s["name"] == "denoise")
    assert host_of(denoise["worker"]) != dead and denoise["lost_runs"] >= 1
    assert same_render(output(job), references[(90, "slow")])
    assert_no_orphans(cluster)
    cluster.wait_ready([cluster.start_worker(dead, "gpu")])


def fetch_from_client(cluster: Cluster, url: str, ca: Path | None) -> str:
    """An https GET from the client host with the console password: its status, or the
    error's type and words (what a user's client would say)."""
    code = (
        "import sys\nfrom tests.helpers import http\n"
        "try:\n    print(http(sys.argv[1], sys.argv[2], ca=sys.argv[3] or None)[0])\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    auth = f"farm:{cluster.env['FARM_FLOWER_PASSWORD']}"
    argv = [sys.executable, "-c", code, url, auth, str(ca or "")]
    return cluster.hosts.run("client", argv, cluster.host_env("client")).stdout.strip()


def test_consoles_over_tls_from_another_host(cluster: Cluster) -> None:
    """`farm ui`, `farm metrics` and Flower (which reads the broker over TLS itself) on the
    control host with the stack's own certificate for its address, reached from the client
    host: verified against the stack's CA, refused by a client that trusts only the system's
    CAs."""
    address = cluster.hosts.address("control")
    tls_dir = cluster.root / "control" / "tls"
    env = cluster.host_env("control") | {
        "FARM_CONSOLE_TLS_CERT": str(tls_dir / f"server-{address}.pem"),
        "FARM_CONSOLE_TLS_KEY": str(tls_dir / f"server-{address}.key"),
        "FARM_UI_ADDRESS": address,
        "FARM_METRICS_ADDRESS": address,
    }
    logs = cluster.root / "logs"
    commands = {"ui": ["ui"], "metrics": ["metrics"], "flower": ["flower", "--address", address]}
    consoles = [
        cluster.hosts.spawn("control", [*FARM, *args], env, logs / f"control-{name}.log")
        for name, args in commands.items()
    ]
    ca = tls_dir / "ca.pem"
    urls = [f"https://{address}:{port}/{page}" for port, page in PAGES]
    try:
        for url in urls:
            wait_until(lambda u=url: fetch_from_client(cluster, u, ca) == "200", timeout=60)
            refused = fetch_from_client(cluster, url, None)
            assert "CERTIFICATE_VERIFY_FAILED" in refused or "verify failed" in refused, refused
    finally:
        for console in consoles:
            console.terminate()
            console.wait(10)
