"""The built-in pipelines: Stable Diffusion img2img and txt2img, and the farm's own probes.

Their stages are declared here, with what each reads, writes and needs; the functions live in
farm.stages and are imported when a stage first runs, since they import torch and diffusers,
which a client never needs.
"""

from __future__ import annotations

from farm.fanout import FANOUT
from farm.narrated import NARRATED
from farm.pipelines import CPU, GPU, SD_MODEL, Pipeline, Stage, lazy, linear
from farm.schema import Param, RenderSchema
from farm.storage.kinds import INPUT
from farm.upscale import UPSCALE

SD_STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("preprocess", lazy("farm.stages.preprocess"), reads=(INPUT,)),
        Stage("encode", lazy("farm.stages.encode"), model=SD_MODEL),
        Stage("noise", lazy("farm.stages.noise"), model=SD_MODEL),
        Stage("noise_txt2img", lazy("farm.stages.noise", "run_txt2img"), reads=(), model=SD_MODEL),
        Stage("denoise", lazy("farm.stages.denoise"), model=SD_MODEL),
        Stage("decode", lazy("farm.stages.decode"), model=SD_MODEL),
        Stage("postprocess", lazy("farm.stages.postprocess"), writes="png"),
        Stage("noop", lazy("farm.stages.noop"), reads=(INPUT, "tensors")),
    )
}

IMG2IMG = linear(
    "img2img",
    [
        ("preprocess", CPU, "preprocess"),
        ("encode", GPU, "encode"),  # feature extraction
        ("noise", GPU, "noise"),  # noise injection
        ("denoise", GPU, "denoise"),
        ("decode", GPU, "decode"),
        ("postprocess", CPU, "postprocess"),
    ],
    SD_STAGES,
    params=RenderSchema(img2img=True),
    help="Stable Diffusion image to image: the input re-rendered towards the prompt.",
)

TXT2IMG = linear(
    "txt2img",
    [
        ("noise", GPU, "noise_txt2img"),  # pure noise from the seed, full schedule
        ("denoise", GPU, "denoise"),
        ("decode", GPU, "decode"),
        ("postprocess", CPU, "postprocess"),
    ],
    SD_STAGES,
    needs_input=False,
    params=RenderSchema(),
    help="Stable Diffusion text to image: a picture from the prompt alone.",
)

# Six stages that only carry a small artifact along the same queues as img2img: what the
# farm's own machinery costs per stage (benchmarks/overhead.py).
NOOP = linear(
    "noop",
    [(f"noop{i}", q, "noop") for i, q in enumerate([CPU, GPU, GPU, GPU, GPU, CPU], 1)],
    SD_STAGES,
    params=RenderSchema(),
    help="Six stages that do nothing: what the farm itself costs per stage.",
)

# cpu noop -> a gpu stage that only waits hold_ms -> cpu noop: a render of a realistic length
# that costs no CPU, so the control plane's ceiling across many gpu hosts can be measured on a
# small machine (benchmarks/cluster.py).
SLEEP = linear(
    "sleep",
    [("take", CPU, "noop"), ("hold", GPU, "hold"), ("give", CPU, "noop")],
    {"noop": SD_STAGES["noop"], "hold": Stage("hold", lazy("farm.stages.hold"))},
    params=RenderSchema(
        extra=(Param("hold_ms", int, 200, "Milliseconds the gpu stage waits (200).", 0, 60000),)
    ),
    help="A cpu no-op, a gpu stage that only waits hold_ms, a cpu no-op: farm load tests.",
)

BUILTIN: tuple[Pipeline, ...] = (IMG2IMG, TXT2IMG, NOOP, SLEEP, FANOUT, UPSCALE, NARRATED)
