"""Apply Alembic migrations from code (``farm db upgrade``, ``farm up``, tests).

The migrations travel inside the package: ``farm/migrations`` and ``farm/alembic.ini`` link to
the repository's top-level ``migrations/`` and ``alembic.ini`` (where ``alembic`` run in a
checkout finds them), and a wheel holds copies, so an installed farm needs no checkout.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config


def alembic_config(database_url: str) -> Config:
    """The packaged alembic.ini with the URL injected (never committed to the file)."""
    package = resources.files("farm")
    cfg = Config(str(package / "alembic.ini"))
    cfg.set_main_option("script_location", str(package / "migrations"))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade_head(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


def downgrade_base(database_url: str) -> None:
    command.downgrade(alembic_config(database_url), "base")
