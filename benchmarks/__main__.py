"""``python -m benchmarks [NAME ...]``: run the CPU benchmarks on a fresh local stack.

With no names it runs overhead, observe, e2e, engine, resume, bulk_submit, join and batch_bound
(``make bench``); each writes ``benchmarks/results/NAME.json`` and a summary table is printed
at the end. The GPU benchmark has its own entry point (``python -m benchmarks.gpu``) because it
needs CUDA. ``cluster`` runs by name only: it needs root for network namespaces (it skips with
the reason where they cannot be made) and starts its own servers on a simulated control host.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import time

from benchmarks.harness import Row, Skipped, bench_session, print_table, write_result

CPU_BENCHMARKS = (
    "overhead",
    "observe",
    "e2e",
    "engine",
    "resume",
    "bulk_submit",
    "join",
    "batch_bound",
)
# Run by name only (not in `make bench`): it needs root for network namespaces.
BY_NAME = ("cluster",)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if "gpu" in args.names:
        from benchmarks import gpu

        return gpu.main([])
    unknown = sorted(set(args.names) - set(CPU_BENCHMARKS) - set(BY_NAME))
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {CPU_BENCHMARKS + BY_NAME}")
        return 2
    logging.basicConfig(level=logging.WARNING)
    rows = run_all(args.names or list(CPU_BENCHMARKS), args.torch_threads)
    print_table(rows)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(CPU_BENCHMARKS)}, or gpu")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads for workers and baselines alike (default 1; FARM_BENCH_TORCH_THREADS)",
    )
    return parser


def run_all(names: list[str], torch_threads: int | None) -> list[Row]:
    """Each benchmark on its own fresh stack (a few seconds each): nothing one leaves behind
    (queued jobs the reconciler would resend, a grown database) can slow the next."""
    rows: list[Row] = []
    started = time.perf_counter()
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name} ...", flush=True)
        began = time.perf_counter()
        # a benchmark with NEEDS_STACK = False starts its own servers (cluster: on simulated hosts)
        needs_stack = getattr(module, "NEEDS_STACK", True)
        session = bench_session(torch_threads) if needs_stack else contextlib.nullcontext()
        try:
            with session as bench:
                result = module.run(bench)
        except Skipped as skipped:
            print(f"   skipped: {skipped}", flush=True)
            continue
        path = write_result(name, result, began)
        print(f"   {path} ({time.perf_counter() - began:.0f} s)", flush=True)
        rows += result["rows"]
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
