"""GPU worker: one process per GPU, never forked after CUDA is touched.

Prefork children cannot re-initialise CUDA once the parent touched it, so the GPU role runs
the solo pool: the model loads once in the worker process and stays warm. Run one worker per
GPU with CUDA_VISIBLE_DEVICES.
"""

from farm.tasks.app import make_queue

CELERY = {
    "task_queues": [make_queue("gpu")],
    "worker_pool": "solo",
    "worker_concurrency": 1,
    "worker_prefetch_multiplier": 1,
}
