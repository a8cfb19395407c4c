"""`farm pipelines` as a user runs it: the real `farm` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.test_cli import run_farm

BUILTIN = ["img2img", "txt2img", "noop", "fanout"]


def listed(env: dict[str, str] | None = None) -> dict[str, dict]:
    """`farm pipelines --json` by name, with no farm configured: it needs no server."""
    result = run_farm(["pipelines", "--json"], env or {})
    assert result.returncode == 0, result.stderr
    return {p["name"]: p for p in json.loads(result.stdout)}


def dag(pipeline: dict) -> list[tuple[str, str, list[str]]]:
    return [(s["name"], s["queue"], s["after"]) for s in pipeline["stages"]]


def test_pipelines_json_lists_each_pipeline_with_its_dag_and_parameters() -> None:
    pipelines = listed()
    assert list(pipelines)[:4] == BUILTIN and "variants" in pipelines
    img2img = pipelines["img2img"]
    assert img2img["needs_input"] and not img2img["expands"]
    assert dag(img2img)[:2] == [("preprocess", "cpu", []), ("encode", "gpu", ["preprocess"])]
    assert img2img["stages"][-1]["op"] == "postprocess"
    assert not pipelines["txt2img"]["needs_input"]
    fanout = pipelines["fanout"]
    assert fanout["expands"] and not fanout["needs_input"]
    assert dag(fanout) == [
        ("split", "cpu", []),
        ("branch-0", "cpu", ["split"]),
        ("branch-1", "cpu", ["split"]),
        ("join", "cpu", ["branch-0", "branch-1"]),
    ]
    variants = pipelines["variants"]
    assert variants["expands"] and variants["needs_input"]
    assert dag(variants)[-1] == (
        "sheet",
        "cpu",
        [f"variant-{f}" for f in ("blur", "edges", "emboss")],
    )
    params = {p["name"]: p for p in variants["params"]}
    assert (
        params["filters"]["default"] == "blur,edges,emboss" and params["filters"]["type"] == "str"
    )
    assert params["passes"]["range"] == "[1, 200]"
    assert {p["name"]: p["choices"] for p in fanout["params"]}["shape"] == ["fan", "chain"]


def test_pipelines_table_shows_each_pipeline_its_stages_and_parameters() -> None:
    result = run_farm(["pipelines"], {})
    assert result.returncode == 0 and not result.stderr, result.stderr
    lines = result.stdout.splitlines()
    for name in [*BUILTIN, "variants"]:
        assert any(line.startswith(f"{name}  ") for line in lines), name
    join = [line for line in lines if "│ join " in line]
    assert len(join) == 1 and "branch-0, branch-1" in join[0], join
    assert result.stdout.count("built at submit from its parameters; shown with the defaults") == 2
    assert "parameters: as img2img's" in result.stdout  # txt2img and noop share its schema
    assert '"blur,edges,emboss"' in result.stdout


def test_a_plugin_that_fails_to_load_is_named_and_the_others_still_listed(tmp_path: Path) -> None:
    """A package whose entry point names a module that is not there: a real broken install."""
    info = tmp_path / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[farm.pipelines]\nbroken = farm_not_there:PIPELINE\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.getenv("PYTHONPATH")]))}
    result = run_farm(["pipelines", "--json"], env)
    assert result.returncode == 0, result.stderr
    assert {*BUILTIN, "variants"} <= {p["name"] for p in json.loads(result.stdout)}
    warning = result.stderr.strip().splitlines()
    assert len(warning) == 1 and "plugin broken left out" in warning[0], result.stderr
    assert "farm_not_there" in warning[0] and "Traceback" not in result.stderr
    assert "plugin broken left out" in run_farm(["pipelines"], env).stderr
