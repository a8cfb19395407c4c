"""GPU worker: one process per GPU, never forked after CUDA is touched.

Prefork children cannot re-initialise CUDA once the parent touched it. The solo pool avoids the
fork but runs a stage on the worker's event loop, so while it renders the worker sends no
heartbeats and answers no remote control: Flower shows it offline. The GPU role therefore runs
the threads pool with one thread: CUDA is used from that thread of the worker process, the model
loads once per process and stays warm, and the event loop stays free for heartbeats, task events
and inspect replies. With late acks and a prefetch multiplier of 1, one message is reserved at a
time. Run one worker per GPU with CUDA_VISIBLE_DEVICES.
"""

from farm.tasks.app import make_queue

CELERY = {
    "task_queues": [make_queue("gpu")],
    "worker_pool": "threads",
    "worker_concurrency": 1,
    "worker_prefetch_multiplier": 1,
}
