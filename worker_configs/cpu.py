"""CPU worker: preprocess and postprocess, light and parallel, no model loaded.

Prefork with one child per core; children are recycled now and then to bound Pillow and
allocator growth.
"""

import os

from farm.tasks.app import make_queue

CELERY = {
    "task_queues": [make_queue("cpu")],
    "worker_pool": "prefork",
    "worker_concurrency": int(os.environ.get("FARM_CPU_CONCURRENCY", os.cpu_count() or 1)),
    "worker_prefetch_multiplier": 1,
    "worker_max_tasks_per_child": 1000,
}
