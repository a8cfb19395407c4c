"""Pipelines users add themselves: the example plugin (examples/farm-variants), installed by
`make install` through its entry point, rendered by real workers; what the registry refuses."""

from __future__ import annotations

import io
from importlib.metadata import EntryPoint

import pytest
from PIL import Image

from farm import plugins
from farm.errors import InvalidParameter, UnknownPipeline
from farm.pipelines import all_pipelines, get_pipeline
from farm.tasks import models
from tests.helpers import sample_png


def test_the_example_plugin_is_registered_through_its_entry_point() -> None:
    variants = all_pipelines()["variants"]
    assert [s.name for s in variants.stages] == [
        "load",
        "variant-blur",
        "variant-edges",
        "variant-emboss",
        "sheet",
    ]
    assert variants.stage("sheet").after == ("variant-blur", "variant-edges", "variant-emboss")
    assert plugins.plugin_errors() == {}


def test_the_plugin_renders_a_fan_out_and_its_join_through_real_workers(farm, running) -> None:
    job = farm.submit(sample_png(hue=30), pipeline="variants", filters="tone,edges", size=64)
    assert job.wait(timeout=120).status == "done"
    stages = {s.name: s for s in job.stages()}
    assert set(stages) == {"load", "variant-tone", "variant-edges", "sheet"}
    assert stages["sheet"].after == ("variant-tone", "variant-edges")
    sheet = Image.open(io.BytesIO(job.result()))
    assert sheet.format == "PNG" and sheet.width == 2 * 64  # two variants side by side


def test_the_dag_is_built_from_the_parameters_at_submit_and_bad_ones_are_refused(farm) -> None:
    before = len(farm.jobs(limit=None))
    with pytest.raises(InvalidParameter, match="filters must name different filters"):
        farm.submit(sample_png(hue=31), pipeline="variants", filters="blur,nosuch")
    with pytest.raises(InvalidParameter, match="passes must be between 1 and 200"):
        farm.submit(sample_png(hue=31), pipeline="variants", passes=0)
    assert len(farm.jobs(limit=None)) == before  # nothing recorded


def test_a_folder_with_bad_plugin_parameters_is_refused_before_anything_is_stored(
    farm, tmp_path
) -> None:
    (tmp_path / "a.png").write_bytes(sample_png(hue=32))
    before = len(farm.jobs(limit=None))
    with pytest.raises(InvalidParameter, match="filters must name different filters"):
        farm.submit_folder(tmp_path, pipeline="variants", filters="blur,blur")
    assert len(farm.jobs(limit=None)) == before


def test_an_input_given_to_a_pipeline_that_takes_none_is_refused(farm) -> None:
    with pytest.raises(InvalidParameter, match="takes no input"):
        farm.submit(sample_png(hue=33), pipeline="fanout")


def test_a_pipeline_model_is_loaded_once_per_process(settings) -> None:
    variants = get_pipeline("variants")
    first = models.load(variants, "tone-curve", settings)
    assert models.load(variants, "tone-curve", settings) is first


@pytest.mark.parametrize("name", ["nosuch", "os.system", "farm_variants", "farm_variants:PIPELINE"])
def test_a_pipeline_not_registered_is_refused_never_imported(name) -> None:
    with pytest.raises(UnknownPipeline, match=r"Choose one of: .*variants"):
        get_pipeline(name)


def test_a_broken_plugin_is_left_out_saying_why_and_the_others_load(monkeypatch) -> None:
    good = EntryPoint("variants", "farm_variants:PIPELINE", plugins.GROUP)
    missing = EntryPoint("broken", "no_such_module_here:PIPELINE", plugins.GROUP)
    wrong = EntryPoint("wrong", "farm.pipelines:CPU", plugins.GROUP)  # a str
    monkeypatch.setattr(plugins, "_errors", {})
    monkeypatch.setattr(plugins, "entry_points", lambda group: [missing, good, wrong])
    loaded = plugins.load_plugins({"img2img"})
    assert [p.name for p in loaded] == ["variants"]
    errors = plugins.plugin_errors()
    assert "ModuleNotFoundError" in errors["broken"]
    assert "not a farm.pipelines.Pipeline" in errors["wrong"]


def test_a_plugin_cannot_replace_a_builtin_pipeline(monkeypatch) -> None:
    monkeypatch.setattr(plugins, "_errors", {})
    point = EntryPoint("variants", "farm_variants:PIPELINE", plugins.GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [point])
    assert plugins.load_plugins({"variants"}) == []
    assert "registered already" in plugins.plugin_errors()["variants"]
