"""Output names of `farm render`: the naming rule (README, "CLI"), then the collisions a user
met, through the real command on the real stack."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from farm.follower import NAME_MAX, output_names, renamed
from tests.helpers import sample_png
from tests.test_cli import FAST, run_farm

LONG = "s" * 250


def test_names_of_one_stem_never_collide() -> None:
    out = output_names(["p.jpg", "p.png", "p.jpg.png"])
    assert out == {"p.png": "p.png", "p.jpg.png": "p.jpg.png", "p.jpg": "p.jpg (2).png"}


def test_the_rule_does_not_depend_on_the_order_of_the_inputs() -> None:
    names = ["p.jpg", "p.png", "p.jpg.png", "p.webp", "q.gif", "x.jpg", "x.png/a.jpg"]
    outputs = {
        tuple(sorted(output_names(list(order)).items())) for order in itertools.permutations(names)
    }
    assert len(outputs) == 1


def test_a_folder_of_inputs_is_never_an_output_file() -> None:
    out = output_names(["x.jpg", "x.png/a.jpg"])
    assert out == {"x.jpg": "x.jpg.png", "x.png/a.jpg": "x.png/a.png"}


def test_names_that_are_not_utf8_keep_their_bytes() -> None:
    names = [os.fsdecode(b"a\xff.png"), os.fsdecode(b"a\xfe.jpg")]
    out = output_names(names)
    assert [os.fsencode(out[n]) for n in names] == [b"a\xff.png", b"a\xfe.png"]


def test_a_name_too_long_is_cut_to_fit_and_kept_apart() -> None:
    out = output_names([f"{LONG}.jpg", f"{LONG}.png", "é" * 126 + ".jpg"])
    assert out[f"{LONG}.png"] == f"{LONG}.png"
    cut = out[f"{LONG}.jpg"]
    assert len(os.fsencode(cut)) <= NAME_MAX and cut.startswith("s" * 200) and "~" in cut
    assert len(os.fsencode(out["é" * 126 + ".jpg"])) <= NAME_MAX  # cut at a character
    assert renamed(f"{LONG}.jpg", cut) == f"renamed {LONG}.jpg -> {cut} ({LONG}.png is taken)"
    assert renamed(f"{LONG}.png", f"{LONG}.png") is None


def test_colliding_names_through_the_cli(farm_env, running, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "x.png").mkdir(parents=True)
    names = [
        b"p.jpg",
        b"p.png",
        b"p.jpg.png",
        b"a\xff.png",
        b"a\xfe.png",
        b"x.jpg",
        b"x.png/in.jpg",
        f"{LONG}.jpg".encode(),
        f"{LONG}.png".encode(),
    ]
    for hue, name in enumerate(names):  # different pictures: one job each
        Path(os.fsdecode(os.fsencode(folder) + b"/" + name)).write_bytes(sample_png(32, 20 * hue))
    out = tmp_path / "out"
    result = run_farm(["render", str(folder), "-o", str(out), "-r", *FAST], farm_env)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "Traceback" not in text and f"{len(names)} inputs: {len(names)} done" in text
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) == len(names)
    assert len({p.read_bytes() for p in written}) == len(names)  # none overwrote another
    assert {b"a\xff.png", b"a\xfe.png"} <= {os.fsencode(p.name) for p in written}
    assert "renamed p.jpg -> p.jpg (2).png (p.png is taken)" in text
    assert "renamed x.jpg -> x.jpg.png (x.png is taken)" in text
    assert f"renamed {LONG}.jpg -> " in text
