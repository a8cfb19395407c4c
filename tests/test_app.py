"""The Celery app's configuration."""

from __future__ import annotations

import redis
from pydantic import SecretStr

from farm.tasks.app import app, celery_config, configure


def test_json_only_late_acks_one_in_flight(settings) -> None:
    conf = celery_config(settings)
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1 and conf["task_ignore_result"]
    transport = conf["broker_transport_options"]
    assert transport["visibility_timeout"] == settings.visibility_timeout


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
