"""GPU worker: one process per GPU, never forked after CUDA is touched, batching its jobs.

Prefork children cannot re-initialise CUDA once the parent touched it. The solo pool avoids the
fork but runs a stage on the worker's event loop, so while it renders the worker sends no
heartbeats and answers no remote control: Flower shows it offline. The GPU role therefore runs
the threads pool: the model loads once per process and stays warm, and the event loop stays free
for heartbeats, task events and inspect replies. Its threads run FARM_GPU_BATCH stages at once
(farm.tasks.app sets the concurrency from the settings), so that many messages are reserved at a
time (late acks, a prefetch multiplier of 1); every model call of those threads goes through the
process's one engine thread, which batches them (farm.engine). Run one worker per GPU with
CUDA_VISIBLE_DEVICES.
"""

from farm.tasks.app import make_queue

CELERY = {
    "task_queues": [make_queue("gpu")],
    "worker_pool": "threads",
    "worker_prefetch_multiplier": 1,
}
