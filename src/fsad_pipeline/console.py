"""Command-line entry points; thin wrappers over the core (no logic of their own).

(Not named ``cli.py``: Kedro treats ``<package>/cli.py`` as a project CLI plugin that must define
``cli``, and every ``kedro`` command fails to start otherwise.)

``fsad-inspect <folder or files...> [--model DIR] [--out DIR] [--threshold X] [--batch-size N]``
scores new images with the promoted model through the same function as the ``inference``
pipeline (:func:`fsad_pipeline.inspection.inspector.run_inspection`).

Inside a project folder (one with ``conf/base``; ``--project`` names another) the defaults come
from its ``inference`` parameters, and the model must match its ``backbone``, ``image_size`` and
``config_version``. Exit status: 0 done (unreadable files, if any, are listed in rejects.csv),
2 bad usage, 3 missing or mismatched model, 4 no readable image.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_NO_IMAGES = 4

#: Used outside a project folder (no conf to take defaults from).
DEFAULT_MODEL_DIR = "models/champion"
DEFAULT_OUTPUT_DIR = "inspection"
DEFAULT_BATCH_SIZE = 16


def _project_parameters(project: Path) -> dict[str, Any] | None:
    """The project's merged parameters (base + local), or None when ``project`` has no conf."""
    conf = project / "conf"
    if not (conf / "base").is_dir():
        return None
    from kedro.config import OmegaConfigLoader

    local = conf / "local"
    loader = OmegaConfigLoader(
        conf_source=str(conf), base_env="base", default_run_env="local" if local.is_dir() else "base"
    )
    return dict(loader["parameters"])


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _inspect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsad-inspect",
        description="Score new images with the promoted anomaly-detection model: verdict (OK/NG), score and "
        "heat-map overlay per image, in <out>/predictions.csv and <out>/overlays/.",
        epilog="Exit status: 0 done, 2 bad usage, 3 missing or mismatched model, 4 no readable image.",
    )
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", help=f"model bundle folder (default: the project's inference.model_dir, else {DEFAULT_MODEL_DIR})")
    parser.add_argument("--out", help="run folder to write (default: the project's inference.output_dir, "
                        f"else ./{DEFAULT_OUTPUT_DIR}); replaced if it holds an earlier inspection")
    parser.add_argument("--threshold", type=float, help="decision threshold (default: the model's calibrated one)")
    parser.add_argument("--batch-size", type=_positive_int, help="images scored at a time (default 16)")
    parser.add_argument("--device", help="auto | cpu | cuda (default: the project's device, else auto)")
    parser.add_argument("--project", type=Path, default=None,
                        help="project folder whose conf gives defaults and the expected backbone, image size and "
                        "config version (default: the current folder, when it has conf/base)")
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def inspect_main(argv: Sequence[str] | None = None) -> int:
    """``fsad-inspect``: returns the exit status (see the module docstring)."""
    parser = _inspect_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def fail(code: int, message: str) -> int:
        print(f"fsad-inspect: error: {message}", file=sys.stderr)
        return code

    project = args.project if args.project is not None else Path.cwd()
    params = _project_parameters(project)
    if params is None and args.project is not None:
        return fail(EXIT_USAGE, f"{project} is not a project folder (no conf/base)")
    settings = dict((params or {}).get("inference") or {})
    expect = None
    if params is not None:
        expect = {key: params.get(key) for key in ("backbone", "image_size", "config_version")}

    def from_project(value: str | None) -> Path | None:
        return None if value is None else (project / value if not Path(value).is_absolute() else Path(value))

    model = Path(args.model) if args.model else from_project(settings.get("model_dir")) or Path(DEFAULT_MODEL_DIR)
    out = Path(args.out) if args.out else from_project(settings.get("output_dir")) or Path(DEFAULT_OUTPUT_DIR)
    threshold = args.threshold if args.threshold is not None else settings.get("threshold")
    batch_size = args.batch_size or int(settings.get("batch_size") or DEFAULT_BATCH_SIZE)
    device = args.device or (params or {}).get("device") or "auto"
    max_pixels = int(((params or {}).get("data") or {}).get("max_pixels") or 0) or None

    from fsad_pipeline.inspection.inspector import NoImagesError, run_inspection
    from fsad_pipeline.model_store.bundle import BundleError

    options: dict[str, Any] = {
        "threshold": threshold,
        "batch_size": batch_size,
        "recursive": bool(settings.get("recursive", True)),
        "overlays": not args.no_overlays and bool(settings.get("overlays", True)),
        "overlay_max_side": settings.get("overlay_max_side", 512),
        "overlay_alpha": float(settings.get("overlay_alpha", 0.5)),
        "progress": not args.quiet,
    }
    if max_pixels:
        options["max_pixels"] = max_pixels
    try:
        result = run_inspection(model, args.inputs, out, expect=expect, device=device, **options)
    except BundleError as error:
        return fail(EXIT_MODEL, str(error))
    except NoImagesError as error:
        return fail(EXIT_NO_IMAGES, str(error))
    except ValueError as error:  # e.g. an output folder that is not ours, a non-finite threshold
        return fail(EXIT_USAGE, str(error))
    summary = result.summary
    rejected = f", {summary['n_rejected']} unreadable (see {out / 'rejects.csv'})" if summary["n_rejected"] else ""
    version = f" with model {summary['model_version']}" if summary.get("model_version") else ""
    print(
        f"fsad-inspect: {summary['n_images']} images, {summary['n_ng']} NG{rejected}, "
        f"{summary['seconds']:.1f} s, {summary['images_per_second']:.2f} img/s{version} -> {out / 'predictions.csv'}"
    )
    return EXIT_OK


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``fsad-serve``: the HTTP inspection service on the champion (see :mod:`fsad_pipeline.inspection.service`).

    Defaults come from the project's ``serve`` and ``inference`` parameters. Exit status: 2 bad
    usage (including a public bind address without ``FSAD_SERVE_TOKEN``), 3 missing or broken model.
    """
    import os

    parser = argparse.ArgumentParser(
        prog="fsad-serve",
        description="Serve verdicts over HTTP: POST /inspect (one image), POST /inspect/batch, GET /health, GET /model. "
        "The champion is loaded once and swapped in when a new one is promoted.",
    )
    parser.add_argument("--host", help="bind address (default 127.0.0.1; another one needs FSAD_SERVE_TOKEN)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--model", help=f"model folder (default: the project's inference.model_dir, else {DEFAULT_MODEL_DIR})")
    parser.add_argument("--project", type=Path, default=None, help="project folder whose conf gives defaults")
    parser.add_argument("--device", help="auto | cpu | cuda (default: the project's device, else cpu)")
    parser.add_argument("--max-batch", type=_positive_int, help="images scored in one forward (default 4)")
    parser.add_argument("--max-wait-ms", type=float, help="how long a request waits for company (default 10)")
    parser.add_argument("--queue-size", type=_positive_int, help="requests waiting before 503 (default 4)")
    parser.add_argument("--max-body-mb", type=_positive_float, help="request body limit in MiB (default 20)")
    parser.add_argument("--reload-interval", type=float, help="seconds between champion checks (default 2; 0: never)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it found is noise here

    project = args.project if args.project is not None else Path.cwd()
    params = _project_parameters(project) or {}
    serve = dict(params.get("serve") or {})
    inference = dict(params.get("inference") or {})

    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else serve.get(key, default)

    model = args.model or inference.get("model_dir") or DEFAULT_MODEL_DIR
    model_dir = Path(model) if Path(model).is_absolute() or args.model else project / model

    from fsad_pipeline.inspection.service import TOKEN_ENV, ServiceSettings, check_bind, create_app
    from fsad_pipeline.model_store.bundle import BundleError

    settings = ServiceSettings(
        model_dir=model_dir,
        host=str(pick(args.host, "host", "127.0.0.1")),
        token=os.environ.get(TOKEN_ENV) or None,
        device=str(args.device or params.get("device") or "auto"),
        max_batch=int(pick(args.max_batch, "max_batch", ServiceSettings.max_batch)),
        max_wait_ms=float(pick(args.max_wait_ms, "max_wait_ms", ServiceSettings.max_wait_ms)),
        queue_size=int(pick(args.queue_size, "queue_size", ServiceSettings.queue_size)),
        max_body_bytes=int(float(pick(args.max_body_mb, "max_body_mb", ServiceSettings.max_body_bytes / 2**20)) * 2**20),
        max_pixels=int((params.get("data") or {}).get("max_pixels") or 40_000_000),
        reload_interval=float(pick(args.reload_interval, "reload_interval", ServiceSettings.reload_interval)),
        overlay_max_side=inference.get("overlay_max_side", 1024),
        overlay_alpha=float(inference.get("overlay_alpha", 0.5)),
        threshold=None if inference.get("threshold") is None else float(inference["threshold"]),
        # In a project, the model must match it, as fsad-inspect requires (on every reload too).
        expect={key: params.get(key) for key in ("backbone", "image_size", "config_version")} if params else None,
    )
    try:
        check_bind(settings.host, settings.token)
    except ValueError as error:
        print(f"fsad-serve: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        app = create_app(settings)
    except (BundleError, FileNotFoundError) as error:
        print(f"fsad-serve: error: {error}", file=sys.stderr)
        return EXIT_MODEL
    except Exception as error:  # a model that cannot be loaded at all: say why, no traceback
        print(f"fsad-serve: error: the model at {model_dir} cannot be loaded: {type(error).__name__}: {error}",
              file=sys.stderr)
        return EXIT_MODEL
    import uvicorn

    # Connections beyond what the queue can hold plus some slack are refused by uvicorn (503),
    # so request bodies cannot pile up in memory before the queue bound applies.
    uvicorn.run(app, host=settings.host, port=int(pick(args.port, "port", 8000)), log_level="info", access_log=False,
                limit_concurrency=settings.queue_size + settings.max_batch + 16)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(inspect_main())


EXIT_BUSY = 75  # EX_TEMPFAIL: another retraining run holds the lock; try again later


def parse_tolerance(text: str) -> float:
    """argparse type of ``--tolerance`` (see :func:`fsad_pipeline.retrain.parse_tolerance`)."""
    from fsad_pipeline.retrain import parse_tolerance as parse

    return parse(text)


def retrain_main(argv: Sequence[str] | None = None) -> int:
    """``fsad-retrain``: retrain on new data, promote only if not worse (see :mod:`fsad_pipeline.retrain`).

    Exit status: 0 nothing to do / promoted / rejected (the decision record says which),
    1 a step failed (champion untouched), 75 another run holds the lock.
    """
    parser = argparse.ArgumentParser(
        prog="fsad-retrain",
        description="Detect new raw data, retrain with `dvc repro`, compare challenger and champion on the "
        "frozen validation set, promote only if not worse; a JSON decision record is written either way.",
    )
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="the Kedro/DVC project (default: here)")
    parser.add_argument("--force", action="store_true", help="retrain even if the raw data did not change")
    parser.add_argument("--tolerance", type=parse_tolerance, default=0.0,
                        help="promote when challenger AUROC >= champion AUROC - tolerance (default 0: not worse)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rollback", action="store_true", help="make the previous champion current again")
    parser.add_argument("--to", default=None, help="with --rollback: the version to restore (e.g. v0002)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from fsad_pipeline.model_store.champion_challenger import RetrainBusy
    from fsad_pipeline.model_store.store import StoreError
    from fsad_pipeline.retrain import OUTCOME_EXIT, retrain, rollback

    if args.rollback:
        try:
            result = rollback(args.project, to=args.to)
        except StoreError as error:
            print(f"fsad-retrain: {error}", file=sys.stderr)
            return EXIT_MODEL
        print(f"fsad-retrain: rolled back; champion is now {result['champion']}")
        return EXIT_OK
    try:
        record = retrain(args.project, force=args.force, tolerance=args.tolerance, device=args.device)
    except RetrainBusy as error:
        print(f"fsad-retrain: {error}", file=sys.stderr)
        return EXIT_BUSY
    outcome = record["outcome"]
    if outcome == "nothing_to_do":
        print("fsad-retrain: nothing to do (raw data unchanged since the champion)")
    else:
        print(f"fsad-retrain: {outcome}: {record.get('reason')} -> {record.get('record_path')}")
    return OUTCOME_EXIT[outcome]
