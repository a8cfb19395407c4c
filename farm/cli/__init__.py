"""The ``farm`` command: a thin layer over farm.api, farm.local and the workers.

One module per group of commands: ``stack`` (the local stack, workers, the database and other
operator commands), ``render`` (render and submit, with their one option set), ``steer``
(inspecting and steering jobs), ``pipelines`` (what the farm can run), ``workers`` (the
live workers and their GPU engines), ``ui`` (the web console).
"""

from __future__ import annotations

import logging
import sys

from rich.markup import escape

from farm.cli import pipelines, render, stack, steer, ui, workers  # noqa: F401 -- registers the commands
from farm.cli.app import app, err
from farm.errors import FarmError


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except FarmError as exc:
        # One line however long (no wrapping), and a message's brackets are not markup.
        err.print(f"[red]error[/] {exc.code}: {escape(exc.message)}", soft_wrap=True)
        sys.exit(2)
