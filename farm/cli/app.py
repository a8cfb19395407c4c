"""The Typer app and the consoles every command module shares."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    help="A render farm for AI image generation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Click's plain help: typer's rich panels print a "<bool>" placeholder after every flag.
    rich_markup_mode=None,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
TIMES = "\N{MULTIPLICATION SIGN}"  # written out: ruff takes the bare sign for a typo of x
console = Console()
err = Console(stderr=True)

DataDir = typer.Option(None, "--data-dir", help="Where the local stack keeps its data.")

JobId = typer.Argument(..., help="A job id as `farm jobs` shows it, or a prefix of it.")
