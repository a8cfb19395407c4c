"""`farm render` and `farm submit`, and the one option set they share."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import typer
import typer.core

from farm.api import Farm
from farm.cli.app import DataDir, app, console, err
from farm.cli.job_view import JobView
from farm.cli.stack import _data_dir
from farm.config import Settings, is_configured
from farm.errors import ConfigError, InvalidParameter
from farm.params import PARAM_HELP
from farm.pipelines import all_pipelines, get_pipeline

# -- rendering ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderOption:
    """One render parameter as a command-line option (its help is farm.params.PARAM_HELP)."""

    kind: type
    flags: tuple[str, ...]


# Every RenderParams parameter (README "Python API"), for `farm render` and `farm submit` alike.
RENDER_OPTIONS: dict[str, RenderOption] = {
    "prompt": RenderOption(str, ("--prompt", "-p")),
    "negative_prompt": RenderOption(str, ("--negative-prompt",)),
    "strength": RenderOption(float, ("--strength",)),
    "steps": RenderOption(int, ("--steps",)),
    "guidance": RenderOption(float, ("--guidance",)),
    "seed": RenderOption(int, ("--seed",)),
    "size": RenderOption(str, ("--size",)),
    "width": RenderOption(int, ("--width",)),
    "height": RenderOption(int, ("--height",)),
    "fit": RenderOption(str, ("--fit",)),
    "scheduler": RenderOption(str, ("--scheduler",)),
    "sharpen": RenderOption(float, ("--sharpen",)),
    "saturation": RenderOption(float, ("--saturation",)),
    "contrast": RenderOption(float, ("--contrast",)),
    "brightness": RenderOption(float, ("--brightness",)),
}


@dataclass(frozen=True)
class RenderArgs:
    """What a rendering command was asked: the pipeline, the priority, and the parameters given,
    typed and checked by the pipeline's schema (which fills in the rest with its defaults)."""

    pipeline: str
    priority: int
    params: dict


ParamOption = typer.Option(
    None,
    metavar="KEY=VALUE",
    help="A parameter of the pipeline (`farm pipelines` lists them); repeatable.",
)


class RenderCommand(typer.core.TyperCommand):
    """Names the registered pipelines in --pipeline's help when the help is shown, and only
    then: listing them loads the plugins, which no other use of the command should pay for."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = ", ".join(all_pipelines())
        for param in self.params:
            if param.name == "pipeline":
                param.help = f"One of: {names} (`farm pipelines` describes them)."
        super().format_help(ctx, formatter)


def render_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` the --pipeline, --param and --priority options and every render option;
    it receives them as one ``render: RenderArgs`` argument. Register it with
    ``cls=RenderCommand``."""
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "render"]
    added = [
        _keyword("pipeline", str, typer.Option("img2img", help="The pipeline to run.")),
        _keyword("param", list[str] | None, ParamOption),
        _keyword("priority", int, typer.Option(5, help="0-9, higher runs first.")),
        *(
            _keyword(name, o.kind, typer.Option(None, *o.flags, help=PARAM_HELP[name]))
            for name, o in RENDER_OPTIONS.items()
        ),
    ]

    @functools.wraps(command)
    def with_render_args(**kwargs: object) -> None:
        flags = {name: kwargs.pop(name) for name in RENDER_OPTIONS}
        pipeline = kwargs.pop("pipeline")
        params = job_params(pipeline, flags, kwargs.pop("param") or [])
        render = RenderArgs(pipeline, kwargs.pop("priority"), params)
        command(**kwargs, render=render)

    with_render_args.__signature__ = inspect.Signature([*own, *added])  # what typer reads
    return with_render_args


def job_params(pipeline: str, flags: dict[str, object], pairs: list[str]) -> dict[str, object]:
    """The render flags given and the ``--param`` pairs, all typed by the pipeline's schema
    (so ``--size 128`` is an int for a pipeline whose size is one) and checked as a whole now,
    before any server is contacted or started: a flag the pipeline has no parameter for is
    INVALID_PARAM naming it and the ones it has. Returns only what was given."""
    given = {name: value for name, value in flags.items() if value is not None}
    keys = {pair.partition("=")[0].strip() for pair in pairs if "=" in pair}
    twice = sorted(set(given) & keys)
    if twice:
        flag = RENDER_OPTIONS[twice[0]].flags[0]
        raise InvalidParameter(f"{twice[0]} is given twice, as {flag} and as --param; give it once")
    schema = get_pipeline(pipeline).params
    params = schema.parse_cli([*(f"{name}={value}" for name, value in given.items()), *pairs])
    schema.validate(params)
    return params


def _keyword(name: str, kind: type, option: object) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


@contextmanager
def _farm(data_dir: Path | None = None) -> Iterator[Farm]:
    """The configured farm; with none configured, an embedded one for the duration:
    the local stack plus one cpu and one gpu worker, all stopped afterwards."""
    if is_configured() and data_dir is None:
        yield Farm.from_env()
        return
    from farm.local import LocalStack
    from farm.local.workers import ONE_MACHINE_QUEUES, ROLES, start_worker, wait_ready

    root = _data_dir(data_dir)
    stack = LocalStack(root)
    err.print(f"[dim]no farm configured: starting an embedded one in {root}[/]")
    info = stack.up()
    env = info.env()
    os.environ.update(env)
    farm = Farm(Settings.from_env())
    logs = root / "logs"
    workers = [start_worker(role, env, logs, ONE_MACHINE_QUEUES[role]) for role in ROLES]
    try:
        wait_ready(farm.ctx.meta, workers)
        yield farm
    finally:
        for w in workers:
            w.stop()
        stack.down()


@app.command(cls=RenderCommand)
@render_options
def render(
    input_dir: Path = typer.Argument(..., help="Folder of images."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the outputs."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Include sub-folders."),
    data_dir: Path | None = DataDir,
    *,
    render: RenderArgs,
) -> None:
    """Render every image of a folder into OUTPUT (<input stem>.png); exits 1 if any failed.
    Re-running the same command skips what is done and follows what is still running."""
    from farm.follower import Follower, summary

    _refuse_input(render.pipeline, "it is for `farm submit`, without an input")
    _output_folder(output)  # before anything is submitted
    embedded = data_dir is not None or not is_configured()  # as _farm decides
    batch = None
    try:
        with _farm(data_dir) as farm:
            batch = farm.submit_folder(
                input_dir,
                recursive,
                pipeline=render.pipeline,
                priority=render.priority,
                **render.params,
            )
            console.print(f"batch {batch.id}", highlight=False)
            suffix = get_pipeline(render.pipeline).output_suffix
            follower = Follower(farm, batch, output, console, suffix, JobView.read)
            jobs = follower.run()
    except KeyboardInterrupt:
        err.print(_interrupted(batch, embedded=embedded), soft_wrap=True, highlight=False)
        raise typer.Exit(130) from None
    for line in follower.renamed:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(summary(jobs, batch.skipped))
    console.print(f"outputs in {output.resolve()}  (batch {batch.id})", highlight=False)
    if any(j.status != "done" for j in jobs):
        raise typer.Exit(1)


def _refuse_input(pipeline: str, what_to_do: str) -> None:
    """An input given to a pipeline that takes none would be dropped unread: say so instead."""
    if not get_pipeline(pipeline).needs_input:
        raise InvalidParameter(f"pipeline {pipeline} takes no input; {what_to_do}")


def _output_folder(output: Path) -> None:
    """Create the output folder, or say in one line why it cannot be."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; give a folder (it is created if new)")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--output {output}: cannot create it ({exc.strerror})") from exc


def _interrupted(batch, *, embedded: bool) -> str:
    """What Ctrl-C leaves behind, and how to go on from there."""
    again = "\n  to continue: re-run the same `farm render` (it skips what is done)"
    if batch is None:
        return f"interrupted while submitting{again}"
    if embedded:
        return f"interrupted: the embedded farm stopped, batch {batch.id} unfinished{again}"
    return (
        f"interrupted: batch {batch.id} goes on rendering on the farm{again}"
        f"\n  to stop it:  farm cancel --batch {batch.id}"
    )


@app.command(cls=RenderCommand)
@render_options
def submit(
    image: Path | None = typer.Argument(
        None, help="Input file; none for a pipeline without input (txt2img, fanout)."
    ),
    *,
    render: RenderArgs,
) -> None:
    """Submit one job and print its id."""
    if image is not None:
        _refuse_input(render.pipeline, "drop the IMAGE argument")
    farm = Farm.from_env()
    job = farm.submit(image, pipeline=render.pipeline, priority=render.priority, **render.params)
    console.print(job.id)
