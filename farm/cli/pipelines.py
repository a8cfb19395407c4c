"""`farm pipelines`: what the farm can run, read from the pipeline registry alone.

It needs no server: an operator checks a node's plugins, and a user a pipeline's parameters,
before anything is started.
"""

from __future__ import annotations

import json
import logging

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from farm.cli.app import app, console, err
from farm.pipelines import Pipeline, all_pipelines
from farm.plugins import plugin_errors

EXPANDS = "built at submit from its parameters; shown with the defaults"


@app.command()
def pipelines(
    as_json: bool = typer.Option(False, "--json", help="One JSON list, an object per pipeline."),
) -> None:
    """List every registered pipeline: its input, its stages with their queues and the stages
    they come after, and its parameters (for --param). Plugins that failed to load are named."""
    # This command shows the plugins left out itself; the registry's log line would repeat it.
    logging.getLogger("farm.plugins").setLevel(logging.ERROR)
    found = list(all_pipelines().values())
    if as_json:
        console.print_json(json.dumps([describe(p) for p in found]))
    else:
        _show_all(found)
    for name, why in plugin_errors().items():  # on stderr: the JSON list keeps its shape
        line = f"[yellow]warning[/] pipeline plugin {escape(name)} left out: {escape(why)}"
        err.print(line, soft_wrap=True)


def describe(pipeline: Pipeline) -> dict[str, object]:
    """JSON-safe: the DAG is the one the default parameters build when ``expands``."""
    return {
        "name": pipeline.name,
        "help": pipeline.help,
        "needs_input": pipeline.needs_input,
        "expands": pipeline.expand is not None,
        "stages": [
            {"name": s.name, "queue": s.queue, "after": list(s.after), "op": s.op}
            for s in pipeline.stages
        ],
        "params": pipeline.params.describe(),
    }


def _show_all(found: list[Pipeline]) -> None:
    """Each pipeline's heading and tables; parameters shown already (the three Stable
    Diffusion pipelines share theirs) are referred to, not printed again."""
    shown: dict[str, str] = {}  # the parameters as JSON -> the first pipeline showing them
    for pipeline in found:
        console.print(Text.assemble((pipeline.name, "bold"), "  ", pipeline.help))
        console.print(f"  input: {'a file per job' if pipeline.needs_input else 'none'}")
        if pipeline.expand is not None:
            console.print(f"  stages: {EXPANDS}")
        console.print(_stage_table(pipeline))
        params = json.dumps(pipeline.params.describe())
        if params in shown:
            console.print(f"  parameters: as {shown[params]}'s", highlight=False)
        else:
            shown[params] = pipeline.name
            console.print(_param_table(pipeline))
        console.print()


def _stage_table(pipeline: Pipeline) -> Table:
    table = Table("stage", "queue", "after", "op")
    for s in pipeline.stages:
        table.add_row(*map(Text, (s.name, s.queue, ", ".join(s.after), s.op)))
    return table


def _param_table(pipeline: Pipeline) -> Table:
    table = Table("parameter", "type", "default", "allowed", "help")
    for p in pipeline.params.describe():
        default = "" if p["default"] is None else json.dumps(p["default"])
        allowed = p["range"] or ", ".join(p["choices"] or ())
        table.add_row(*map(Text, (p["name"], p["type"], default, allowed, p["help"])))
    return table
