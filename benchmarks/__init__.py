"""Reproducible benchmarks of the farm, each a ratio against a baseline measured in the same run.

See benchmarks/README.md; run them with ``make bench`` or ``python -m benchmarks [NAME ...]``.
"""

import os

# Offline, and no progress bars or import chatter from the model libraries in the output; set
# before anything imports them, and inherited by the worker processes the benchmarks start.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
}.items():
    os.environ.setdefault(_name, _value)
