"""The farm-wide view ``farm metrics`` exports, read afresh at each scrape: queue depth per
queue and priority from the broker (RabbitMQ: per queue, priority "all"), jobs by status and
batches in flight from Postgres, live workers by role from their Redis heartbeats. A source
that cannot be read is left out of that scrape, and ``farm_source_up{source=...}`` says 0 for
it."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import distinct, func, select

from farm.db.models import BatchJob, Job, JobStatus
from farm.db.session import session_scope
from farm.errors import FarmError
from farm.pipelines import all_queues
from farm.tasks import rabbitmq
from farm.tasks.app import PRIORITY_STEPS
from farm.tasks.broker_scan import PRIORITY_SEP
from farm.tasks.context import Context

log = logging.getLogger(__name__)
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


class FarmCollector:
    """A prometheus-client collector over one farm's servers."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "farm_source_up", "Whether this scrape could read the source.", labels=["source"]
        )
        for source, read in self._sources().items():
            try:
                families = list(read())
            except (FarmError, OSError, redis.RedisError) as exc:
                log.warning("farm metrics: cannot read the %s: %s", source, exc)
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up

    def _sources(self) -> dict[str, Callable[[], Iterator[Metric]]]:
        return {"broker": self._queues, "database": self._jobs, "redis": self._workers}

    def _queues(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "farm_queue_messages",
            "Stage messages waiting in the broker, by queue and farm priority (9 runs first; "
            '"all" on RabbitMQ, which counts a queue as a whole).',
            labels=["queue", "priority"],
        )
        queues = sorted(all_queues())
        client = self.ctx.broker_redis
        if client is None:  # RabbitMQ: the messages ready in each queue (passive declare)
            url = self.ctx.settings.broker_url.get_secret_value()
            for queue, (ready, _) in rabbitmq.ready_counts(url, queues).items():
                depth.add_metric([queue, "all"], ready)
            yield depth
            return
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for step in PRIORITY_STEPS:
                pipe.llen(f"{queue}{PRIORITY_SEP}{step}" if step else queue)
        lengths = iter(pipe.execute())
        for queue in queues:
            for step in PRIORITY_STEPS:  # kombu's step 0 holds farm priority 9
                depth.add_metric([queue, str(9 - step)], next(lengths))
        yield depth

    def _jobs(self) -> Iterator[Metric]:
        by_status = GaugeMetricFamily("farm_jobs", "Jobs by status.", labels=["status"])
        with session_scope(self.ctx.db_url) as s:
            counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            in_flight = s.scalar(  # a job may belong to several batches (batch_jobs)
                select(func.count(distinct(BatchJob.batch_id)))
                .join(Job, Job.id == BatchJob.job_id)
                .where(Job.status.in_(ACTIVE))
            )
        for status in JobStatus:
            by_status.add_metric([status.value], counts.get(status.value, 0))
        yield by_status
        yield GaugeMetricFamily(
            "farm_batches_in_flight", "Batches with a job queued or running.", in_flight or 0
        )

    def _workers(self) -> Iterator[Metric]:
        live = GaugeMetricFamily(
            "farm_workers", "Workers whose heartbeat is fresh, by role.", labels=["role"]
        )
        for role, count in sorted(
            Counter(w.get("role", "") for w in self.ctx.meta.workers()).items()
        ):
            live.add_metric([role], count)
        yield live
