"""RabbitMQ as the broker, on a real server: priorities, a queue declared otherwise, and the
reconciler's lost messages (the pipeline and worker-kill tests run on it too: test_pipeline.py,
test_faults.py). Skipped, in one line, where RabbitMQ is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from kombu import Connection
from pydantic import SecretStr

from farm.errors import ConfigError
from farm.metrics.farm_wide import FarmCollector
from farm.pipelines import get_pipeline
from farm.tasks.app import configure
from farm.tasks.context import Context
from farm.tasks.dispatch import check_broker, send_stage
from tests.helpers import sample_png, wait_until

PARAMS = {"size": 64, "steps": 4, "strength": 0.8, "prompt": "a harbour", "seed": 5}


def on(settings, url: str):
    return settings.model_copy(update={"broker_url": SecretStr(url)})


def test_a_higher_farm_priority_is_delivered_first(rabbitmq, settings) -> None:
    preprocess = get_pipeline("img2img").stage("preprocess")
    configure(on(settings, rabbitmq))
    try:
        for priority in (1, 9, 5):
            send_stage(f"job{priority}", preprocess, priority)
    finally:
        configure(settings)
    with Connection(rabbitmq) as conn:
        channel = conn.channel()
        taken = iter(lambda: channel.basic_get("cpu", no_ack=True), None)
        assert [json.loads(m.body)[0][0] for m in taken] == ["job9", "job5", "job1"]


def test_a_queue_declared_otherwise_is_one_line_for_a_client_and_a_worker(
    rabbitmq, settings, farm_env
) -> None:
    with Connection(rabbitmq) as conn:  # as another app, or an older farm, left it
        conn.channel().queue_declare("cpu", durable=True, auto_delete=False)
    configure(on(settings, rabbitmq))
    try:
        with pytest.raises(ConfigError, match=r"queue 'cpu' .*x-max-priority.*delete_queue cpu"):
            check_broker()
    finally:
        configure(settings)
    env = {**os.environ, **farm_env, "FARM_BROKER_URL": rabbitmq, "FARM_WORKER_ROLE": "cpu"}
    worker = [sys.executable, "-m", "celery", "-A", "farm.tasks", "worker", "-n", "clash@x"]
    done = subprocess.run(worker, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error CONFIG_INVALID: RabbitMQ holds queue 'cpu' ")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stdout


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_a_stage_whose_message_rabbitmq_lost_is_sent_again(site) -> None:
    farm, workers = site.farm, site.workers
    workers.ensure("gpu")  # its reconciler runs while no cpu worker does
    for worker in workers.of("cpu"):
        workers.kill(worker)
    ctx = Context(site.settings)
    job = farm.submit(sample_png(hue=120), **PARAMS)
    wait_until(lambda: depth(ctx, "cpu") == 1, 30, "preprocess to wait in the cpu queue")
    # Passes of the reconciler past the grace (3 intervals): a queue holding a message
    # may hold this stage's, so nothing is sent again (a second message would show).
    time.sleep(5 * site.settings.reconcile_interval)
    assert depth(ctx, "cpu") == 1 and job.status() == "queued"

    with Connection(site.settings.broker_url.get_secret_value()) as conn:
        conn.channel().queue_purge("cpu")  # the message is lost
    wait_until(lambda: depth(ctx, "cpu") == 1, 30, "the reconciler to send preprocess again")
    workers.start("cpu")
    assert job.wait(timeout=120).status == "done"
    logs = "".join(path.read_text() for path in workers.log_dir.glob("*.log"))
    assert f"re-sending {job.id}/preprocess: the broker lost its message" in logs


def depth(ctx: Context, queue: str) -> float:
    """farm_queue_messages{queue=..., priority="all"}, as `farm metrics` reads it."""
    family = next(m for m in FarmCollector(ctx).collect() if m.name == "farm_queue_messages")
    return next(s.value for s in family.samples if s.labels == {"queue": queue, "priority": "all"})
