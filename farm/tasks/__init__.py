"""Celery app and stage tasks: ``celery -A farm.tasks worker`` finds ``app`` here."""

from farm.tasks.app import app, configure

__all__ = ["app", "configure"]
