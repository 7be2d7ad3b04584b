"""Benchmark: the real ``dfd`` pipeline over several k and seeds, with time and memory.

Each (k, seed) is one ``kedro run --pipelines=dfd`` in a child process, inside a scratch copy
of the project (conf + pyproject) so the benchmark never overwrites your own ``data/``. The
child's peak RSS (its whole process tree) is sampled while it runs. Results go to
``<out>/benchmark.json`` and ``<out>/benchmark.md``.

    python -m fsad_pipeline.benchmark --ks 1 2 4 --seeds 0 1 2
    python -m fsad_pipeline.benchmark --ks 2 --seeds 0 --params dfd.meta_epochs=10

``--fleet`` instead times the ``fleet`` pipeline over 2 and 4 categories (``--fleet-sizes``), once
with the SequentialRunner and once with the DaskRunner on a LocalCluster of 2 single-thread worker
processes (see :mod:`fsad_pipeline.benchmark.fleet`).

    python -m fsad_pipeline.benchmark --fleet --fleet-sizes 2 4

``--suite real`` runs the chain on every real dataset (textile, KolektorSDD, the base categories
under ``--shared-data``) and the plain patch-kNN reference on each run; results in
``<out>/suite.{json,md}`` (see :mod:`fsad_pipeline.benchmark.suite`).

    python -m fsad_pipeline.benchmark --suite real --datasets textile metal_plate --ks 1 2 4 --seeds 0 1 2

``--speed`` runs the project once per (k, seed) (default k = 2, seed 0) on one dataset, then
anomalib's PatchCore on the same supports and test images, and prints both side by side (fit
seconds, predict img/s, peak RSS, image / pixel AUROC, the ratios); results in
``<out>/speed.{json,md}`` (see :mod:`fsad_pipeline.benchmark.peer`; anomalib: ``pip install -e ".[compare]"``).

    python -m fsad_pipeline.benchmark --speed --dataset metal_plate --ks 2 --seeds 0

``--serve`` load-tests the HTTP inspection service: a real ``fsad-serve`` child process on
loopback, 1, 4 and 16 concurrent httpx clients, bad inputs mixed in, the server killed and
restarted midway; results in ``<out>/serve.{json,md}`` (see :mod:`fsad_pipeline.benchmark.serve`).

    python -m fsad_pipeline.benchmark --serve [--model models/champion] [--requests 500]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fsad_pipeline.benchmark.fleet import FLEET_VARIANTS, fleet_benchmark, fleet_markdown
from fsad_pipeline.benchmark.micro import micro_benchmarks
from fsad_pipeline.benchmark.peer import speed_run, write_speed
from fsad_pipeline.benchmark.runs import PROJECT_ROOT, make_workdir, markdown_table, run_once, summarise
from fsad_pipeline.benchmark.suite import SUITES, default_shared_data, run_suite, suite_datasets, suite_markdown


def _suite(args: argparse.Namespace) -> int:
    """``--suite real``: every dataset found x ``--ks`` x ``--seeds``, then the table."""
    datasets = suite_datasets(args.shared_data, args.datasets)
    if not datasets:
        print("[suite] no dataset to run", flush=True)
        return 1
    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="fsad-suite-"))
    scratch.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = run_suite(datasets, args.ks, args.seeds, workdir=scratch, out=args.out,
                     extra_params=args.params, env_name=args.env, keep_runs=args.keep_runs)
    print(suite_markdown(runs))
    return 0


def _speed(args: argparse.Namespace) -> int:
    """``--speed``: the project on ``--dataset`` per (k, seed), then the anomalib PatchCore peer."""
    datasets = suite_datasets(args.shared_data, [args.dataset])
    if not datasets:
        return 1
    dataset = datasets[0]
    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="fsad-speed-"))
    scratch.mkdir(parents=True, exist_ok=True)
    workdir = make_workdir(scratch)
    records = []
    for k in args.ks or [2]:
        for seed in args.seeds or [0]:
            params = ",".join(p for p in (dataset.params, f"k_shot={k}", f"seed={seed}", args.params) if p)
            records.append(speed_run(workdir, params, args.out, label=f"{dataset.name}_k{k}_seed{seed}",
                                     env_name=args.env, with_peer=not args.no_peer))
            text = write_speed(args.out, records)
    print(text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    """``--serve``: the load test of ``fsad-serve`` on ``--model`` (or the champion)."""
    from fsad_pipeline.benchmark.serve import champion_for_benchmark, serve_benchmark, serve_markdown

    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="fsad-serve-benchmark-"))
    scratch.mkdir(parents=True, exist_ok=True)
    record = serve_benchmark(champion_for_benchmark(args.model, scratch), args.out, requests=args.requests)
    print(serve_markdown(record))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="default 1 2 4 (--speed: 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--speed: 0)")
    parser.add_argument("--params", default="", help="extra Kedro runtime params, e.g. dfd.meta_epochs=10")
    parser.add_argument("--env", default=None, help="Kedro environment (e.g. paper)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "08_reporting" / "benchmark")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch project folder (default: a temp dir)")
    parser.add_argument("--micro-only", action="store_true", help="only the coreset / kNN micro-benchmarks")
    parser.add_argument("--fleet", action="store_true", help="time the fleet pipeline: SequentialRunner vs DaskRunner")
    parser.add_argument("--fleet-sizes", type=int, nargs="+", default=[2, 4], help="categories per fleet run")
    parser.add_argument("--fleet-workers", type=int, default=2, help="single-thread Dask worker processes")
    parser.add_argument("--fleet-variants", nargs="+", default=["sequential", "dask"], choices=list(FLEET_VARIANTS),
                        help="runs per fleet size (speed-up is against 'sequential')")
    parser.add_argument("--fleet-root", type=Path, default=None,
                        help="MVTec-layout folder whose first categories form the fleet (default: textile pseudo-categories)")
    parser.add_argument("--suite", choices=SUITES, default=None,
                        help="real: the dfd chain on every real dataset against the plain kNN reference")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="suite: only these datasets (textile, kolektorsdd, grid, juice_bottle, metal_plate, tire)")
    parser.add_argument("--shared-data", type=Path, default=default_shared_data(),
                        help="suite: the folder holding kolektorsdd/ and base_categories/")
    parser.add_argument("--keep-runs", action="store_true",
                        help="suite: keep every run's outputs under <workdir>/runs/ (for re-fits without training)")
    parser.add_argument("--speed", action="store_true",
                        help="the project once per (k, seed) on --dataset, then anomalib's PatchCore side by side")
    parser.add_argument("--dataset", default="textile",
                        help="speed: textile, kolektorsdd or a base category (grid, juice_bottle, metal_plate, tire)")
    parser.add_argument("--no-peer", action="store_true", help="speed: skip the anomalib PatchCore peer")
    parser.add_argument("--serve", action="store_true", help="load-test the HTTP inspection service (fsad-serve)")
    parser.add_argument("--model", type=Path, default=None,
                        help="serve: the model folder (default: models/champion, else the default run promoted)")
    parser.add_argument("--requests", type=int, default=500, help="serve: requests per concurrency level")
    args = parser.parse_args(argv)

    if args.serve:
        return _serve(args)

    if args.speed:
        return _speed(args)
    args.ks = args.ks or [1, 2, 4]
    args.seeds = args.seeds or [0, 1, 2]

    if args.suite:
        return _suite(args)

    if args.fleet:
        args.out.mkdir(parents=True, exist_ok=True)
        scratch = args.workdir or Path(tempfile.mkdtemp(prefix="fsad-fleet-benchmark-"))
        scratch.mkdir(parents=True, exist_ok=True)
        rows = fleet_benchmark(args.fleet_sizes, out=args.out, scratch=scratch, extra_params=args.params,
                               root=args.fleet_root, workers=args.fleet_workers, variants=tuple(args.fleet_variants))
        print(fleet_markdown(rows))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    micro = micro_benchmarks()
    (args.out / "micro.json").write_text(json.dumps(micro, indent=2))
    print("[benchmark] micro:", json.dumps(micro), flush=True)
    if args.micro_only:
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="fsad-benchmark-"))
    scratch.mkdir(parents=True, exist_ok=True)
    workdir = make_workdir(scratch)
    runs = []
    for k in args.ks:
        for seed in args.seeds:
            params = ",".join(p for p in (f"k_shot={k}", f"seed={seed}", args.params) if p)
            print(f"[benchmark] k={k} seed={seed} ...", flush=True)
            result = run_once(workdir, params, env_name=args.env, log_path=args.out / f"run_k{k}_seed{seed}.log")
            runs.append(result)
            print(
                f"[benchmark] k={k} seed={seed}: image AUROC {result['image_auroc']:.3f}, "
                f"train {result['train_seconds']:.0f} s, scoring {result['score_images_per_second']:.1f} img/s, "
                f"peak RSS {result['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
            rows = summarise(runs)
            payload = {"params": args.params, "env": args.env, "micro": micro, "runs": runs, "summary": rows}
            (args.out / "benchmark.json").write_text(json.dumps(payload, indent=2))
            (args.out / "benchmark.md").write_text(markdown_table(rows))
    print(markdown_table(summarise(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
