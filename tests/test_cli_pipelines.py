"""`farm pipelines`, `--pipeline` and `--param`, as a user runs them: the real `farm` command."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import sample_png
from tests.test_cli import run_farm

BUILTIN = ["img2img", "txt2img", "noop", "sleep", "fanout", "upscale", "narrated"]


def listed(env: dict[str, str] | None = None) -> dict[str, dict]:
    """`farm pipelines --json` by name, with no farm configured: it needs no server."""
    result = run_farm(["pipelines", "--json"], env or {})
    assert result.returncode == 0, result.stderr
    return {p["name"]: p for p in json.loads(result.stdout)}


def dag(pipeline: dict) -> list[tuple[str, str, list[str]]]:
    return [(s["name"], s["queue"], s["after"]) for s in pipeline["stages"]]


def test_pipelines_json_lists_each_pipeline_with_its_dag_and_parameters() -> None:
    pipelines = listed()
    assert list(pipelines)[: len(BUILTIN)] == BUILTIN and "variants" in pipelines
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
    assert result.stdout.count("built at submit from its parameters; shown with the defaults") == 4
    assert "parameters: as img2img's" in result.stdout  # txt2img and noop share its schema
    assert '"blur,edges,emboss"' in result.stdout


def test_render_and_submit_help_name_every_pipeline_and_take_param() -> None:
    for command in ("render", "submit"):
        shown = run_farm([command, "--help"], {}).stdout
        assert "--param KEY=VALUE" in shown, shown
        assert f"One of: {', '.join(BUILTIN)}, variants" in " ".join(shown.split())


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


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--param", "nope"], "INVALID_PARAM", ["--param takes key=value", "'nope'"]),
        (["--param", "branches=0"], "INVALID_PARAM", ["branches", "between 1 and 64"]),
        (["--param", "branches=two"], "INVALID_PARAM", ["branches must be a whole number"]),
        (
            ["--param", "zzz=1"],
            "INVALID_PARAM",
            ["unknown parameter(s) 'zzz'", "allowed: branches"],
        ),
        (["--strength", "0.5"], "INVALID_PARAM", ["unknown parameter(s) 'strength'", "branches"]),
        (["--seed", "1", "--param", "seed=2"], "INVALID_PARAM", ["seed is given twice"]),
        (["a.png"], "INVALID_PARAM", ["pipeline fanout takes no input"]),
        (["--pipeline", "nope"], "UNKNOWN_PIPELINE", ["Choose one of:", "fanout", "variants"]),
    ],
)
def test_param_errors_are_one_line_with_a_stable_code(
    args: list[str], code: str, words: list[str]
) -> None:
    """Checked before any server is contacted: nothing is configured here."""
    result = run_farm(["submit", "--pipeline", "fanout", *args], {})
    assert result.returncode == 2 and not result.stdout, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error {code}: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]


def test_render_refuses_a_pipeline_without_input_before_starting_anything(tmp_path: Path) -> None:
    env = {"FARM_DATA_DIR": str(tmp_path / "data")}  # nothing configured: it would embed one
    result = run_farm(
        ["render", str(tmp_path), "-o", str(tmp_path / "out"), "--pipeline", "fanout"], env
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error INVALID_PARAM: pipeline fanout takes no input" in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_submit_fanout_takes_no_input_and_finishes(farm, farm_env, running, tmp_path: Path) -> None:
    args = ["submit", "--pipeline", "fanout", "--param", "branches=3", "--param", "steps=2"]
    submitted = run_farm(args, farm_env)
    job_id = submitted.stdout.strip()
    assert len(job_id) == 32, submitted.stdout + submitted.stderr
    assert farm.get(job_id).wait(timeout=120).status == "done"

    status = json.loads(run_farm(["status", job_id[:12], "--json"], farm_env).stdout)
    assert status["status"] == "done" and status["pipeline"] == "fanout"
    names = ["split", "branch-0", "branch-1", "branch-2", "join"]
    assert [(s["name"], s["status"]) for s in status["stages"]] == [(n, "done") for n in names]
    wide = {**farm_env, "COLUMNS": "200"}  # the stage table on one line per stage
    table = run_farm(["status", job_id[:12]], wide).stdout
    assert re.search(r"join\W+cpu\W+branch-0, branch-1, branch-2\W+done", table), table
    assert re.search(r"branch-1\W+cpu\W+split\W+done", table), table
    saved = run_farm(["result", job_id, "-o", str(tmp_path / "fanout.json")], farm_env)
    assert saved.returncode == 0, saved.stderr
    output = json.loads((tmp_path / "fanout.json").read_text())
    assert sorted(output["branches"]) == names[1:4]


def test_render_a_folder_through_the_variants_plugin(farm_env, running, tmp_path: Path) -> None:
    """Two inputs, two filters: two sheets two tiles wide; --size is the plugin's own (an int)."""
    (tmp_path / "in").mkdir()
    for i, name in enumerate(["dune.png", "reef.png"]):
        (tmp_path / "in" / name).write_bytes(sample_png(96, hue=50 * i))
    out = tmp_path / "out"
    args = ["render", str(tmp_path / "in"), "-o", str(out), "--pipeline", "variants"]
    result = run_farm([*args, "--param", "filters=blur,edges", "--size", "48"], farm_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 done" in result.stdout
    for name in ("dune.png", "reef.png"):
        with Image.open(out / name) as sheet:
            assert sheet.size == (2 * 48, 48 + 16)  # a tile and its label's row
