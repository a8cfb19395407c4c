"""One narrated video and one 2x upscale, through the Python API, on the farm `farm up` started
(``make demo`` runs it): python examples/multimodal.py OUTPUT_FOLDER"""

from __future__ import annotations

import sys
from pathlib import Path

from farm import Farm

HERE = Path(__file__).parent


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    farm = Farm.from_env()
    jobs = {
        "narrated.mp4": farm.submit(
            pipeline="narrated", prompt="a lighthouse on a cliff at dusk, waves below", seed=1
        ),
        "landscape-x2.png": farm.submit(
            HERE / "inputs" / "landscape.png", pipeline="upscale", scale=2, prompt="a landscape"
        ),
    }
    for name, job in jobs.items():
        info = job.wait(timeout=1800)
        if info.status != "done":
            sys.exit(f"{name}: job {job.id} {info.status}: {info.error_code} {info.error_message}")
        print(f"{name}: {job.save(out / name)}\n  {timings(job.stages())}")


def timings(stages) -> str:
    """Each stage's time and queue; upscale's tiles as their count and median time."""
    tiles = sorted(s.duration_s for s in stages if s.name.startswith("tile-"))
    shown = [
        f"{s.name} ({s.queue}) {s.duration_s:.2f}s"
        for s in stages
        if not s.name.startswith("tile-")
    ]
    if tiles:
        shown.insert(1, f"{len(tiles)} tiles (gpu) median {tiles[len(tiles) // 2]:.2f}s")
    return ", ".join(shown)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output"))
