"""Celery settings per worker role, layered on farm.tasks.app.celery_config."""
