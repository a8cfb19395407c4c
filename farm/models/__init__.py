"""Model loading: a local diffusers folder (or the tiny demo model), once per process."""

from farm.models.loader import (
    TINY_MODEL_SUBDIR,
    ModelBundle,
    ensure_tiny_model,
    load_model,
    resolve_device,
)
from farm.models.schedulers import SCHEDULERS, make_scheduler
from farm.models.tiny import build_tiny_pipeline, build_tiny_tokenizer

__all__ = [
    "SCHEDULERS",
    "TINY_MODEL_SUBDIR",
    "ModelBundle",
    "build_tiny_pipeline",
    "build_tiny_tokenizer",
    "ensure_tiny_model",
    "load_model",
    "make_scheduler",
    "resolve_device",
]
