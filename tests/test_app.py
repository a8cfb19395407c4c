"""The Celery app's configuration."""

from __future__ import annotations

import redis
from pydantic import SecretStr

from farm.tasks.app import app, celery_config, celery_priority, configure


def test_json_only_late_acks_one_in_flight(settings) -> None:
    conf = celery_config(settings)
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1 and conf["task_ignore_result"]
    transport = conf["broker_transport_options"]
    assert transport["visibility_timeout"] == settings.visibility_timeout


def test_rabbitmq_gets_priority_queues_confirmed_sends_and_no_redis_options(settings) -> None:
    rabbit = settings.model_copy(update={"broker_url": SecretStr("amqp://u:p@rabbit:5672//")})
    conf = celery_config(rabbit)
    assert conf["task_queue_max_priority"] == 10
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    assert conf["task_acks_late"] and conf["worker_prefetch_multiplier"] == 1
    assert "visibility_timeout" not in conf
    assert celery_config(settings)["task_queue_max_priority"] is None


def test_farm_priorities_map_onto_each_transports_order() -> None:
    # RabbitMQ delivers a higher message priority first; kombu's Redis transport a lower one
    assert [celery_priority(p, "amqp") for p in (0, 5, 9)] == [0, 5, 9]
    assert [celery_priority(p, "redis") for p in (0, 5, 9)] == [9, 4, 0]
    assert celery_priority(12, "amqp") == 9 and celery_priority(-1, "redis") == 9


def test_configure_switches_to_another_broker(stack, settings) -> None:
    base = stack.redis_url.rsplit("/", 1)[0]
    brokers = [f"{base}/2", f"{base}/3"]
    try:
        for url in brokers:
            configure(settings.model_copy(update={"broker_url": SecretStr(url)}))
            app.send_task("farm.cpu.ping", queue="cpu")
        for url in brokers:
            client = redis.Redis.from_url(url)
            assert client.llen("cpu") == 1, url
            client.flushdb()
    finally:
        configure(settings)


def test_a_message_a_worker_took_long_ago_counts_as_lost(stack) -> None:
    import base64
    import json
    import time

    from farm.tasks.broker_scan import UNACKED, UNACKED_INDEX, held_stages

    client = redis.Redis.from_url(stack.redis_url.rsplit("/", 1)[0] + "/4")
    body = base64.b64encode(json.dumps([["job1", "denoise"], {}, {}]).encode()).decode()
    message = {"body": body, "headers": {"task": "farm.gpu.run_stage"}}
    client.hset(
        UNACKED,
        mapping={
            "old": json.dumps([message, "gpu", "gpu"]),
            "new": json.dumps([message | {}, "gpu", "gpu"]),
        },
    )
    client.zadd(UNACKED_INDEX, {"old": time.time() - 600})
    assert held_stages(client, ["gpu"], taken_within=30) == set()
    client.zadd(UNACKED_INDEX, {"new": time.time()})
    assert held_stages(client, ["gpu"], taken_within=30) == {("job1", "denoise")}
    client.flushdb()
