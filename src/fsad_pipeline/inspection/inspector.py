"""Inspecting new images with a promoted model bundle: verdict, score, overlay, defect type.

:func:`inspect_images` is the one function behind both the ``inference`` Kedro pipeline and the
``fsad-inspect`` command. It streams the images chunk by chunk (nothing scales with the number
of images but the table), lists unreadable files instead of stopping, and writes one run folder::

    <out>/
      predictions.csv    one row per scored image: verdict (OK/NG), pred_label, pred_score,
                         threshold, each scorer's score, overlay file, original size, and the
                         defect type columns when the bundle has a classifier
      rejects.csv        path, reason for every input that could not be read
      summary.json       model, threshold, counts, seconds, images/s
      overlays/          NNNNN_<stem>.png: the image with its anomaly map and verdict
      report.html        one self-contained page: every image ranked by score with its heat map,
                         verdict and defect type (thumbnails embedded, so it can be mailed)
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from fsad_pipeline.artifacts import atomic_directory, write_json, write_png
from fsad_pipeline.data.geometry import ResizedMaps, capped_size
from fsad_pipeline.data.images import DEFAULT_MAX_PIXELS, is_image_file
from fsad_pipeline.data.layouts import ANNOTATION_FOLDERS
from fsad_pipeline.evaluation.figures import heatmap_overlay_image
from fsad_pipeline.evaluation.html_report import render_html_report, save_html_report
from fsad_pipeline.model_store.bundle import CLASSIFIER_COLUMNS, ModelBundle
from fsad_pipeline.scoring.batch import iter_scored_chunks

PREDICTIONS_FILE = "predictions.csv"
REJECTS_FILE = "rejects.csv"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
OVERLAY_DIR = "overlays"
logger = logging.getLogger(__name__)

REJECT_COLUMNS = ["path", "reason"]
VERDICTS = {0: "OK", 1: "NG"}


class NoImagesError(ValueError):
    """Nothing to inspect: no image file among the inputs, or none of them could be read."""


@dataclass
class InspectionResult:
    predictions: pd.DataFrame
    rejects: pd.DataFrame
    summary: dict
    output_dir: Path


def _folder_images(folder: Path, recursive: bool, skip: Path | None) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for path in candidates:
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative[:-1]) or not is_image_file(path):
            continue  # hidden folders (staging dirs, .git) are not inputs
        if any(part in ANNOTATION_FOLDERS for part in relative[:-1]):
            continue  # the masks of an MVTec category or a folder drop are annotations, not parts
        if skip is not None and path.resolve().is_relative_to(skip):
            continue  # an earlier run's overlays inside the inbox are not new images
        found.append(path)
    return sorted(found)


def collect_image_paths(
    inputs: str | Path | Sequence[str | Path], *, recursive: bool = True, exclude: str | Path | None = None
) -> tuple[list[str], list[dict]]:
    """Expand folders and files into image paths (sorted per folder, duplicates dropped).

    A file named directly is always taken (the reader decides whether it is an image); a
    folder contributes its files with an image suffix, hidden files and folders, the layouts'
    mask folders (``ground_truth/``, ``masks/``) and anything under ``exclude`` (the run's
    output folder) left out. Inputs that do not exist come back
    as rejects.
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    skip = Path(exclude).resolve() if exclude is not None else None
    paths: list[str] = []
    rejects: list[dict] = []
    seen: set[str] = set()
    for item in items:
        item = Path(item)
        if item.is_dir():
            found = _folder_images(item, recursive, skip)
        elif item.exists():
            found = [item]
        else:
            rejects.append({"path": str(item), "reason": "does not exist"})
            continue
        for path in found:
            key = str(path.resolve())
            if key not in seen:
                seen.add(key)
                paths.append(str(path))
    return paths, rejects


def _no_image_files(inputs: str | Path | Sequence[str | Path]) -> NoImagesError:
    """The error for inputs without a single image file: a path that does not exist is named as such."""
    items = [Path(i) for i in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    missing = [str(item) for item in items if not item.exists()]
    present = [str(item) for item in items if item.exists()]
    parts = []
    if missing:
        parts.append(f"{'path does' if len(missing) == 1 else 'paths do'} not exist: {', '.join(missing)}")
    if present or not items:
        parts.append(f"no image files found in {', '.join(present) or '(nothing given)'}")
    return NoImagesError("; ".join(parts))


def _check_output_dir(output_dir: Path) -> None:
    """Refuse to replace a non-empty folder that is not an earlier inspection output."""
    if output_dir.exists() and (not output_dir.is_dir() or (any(output_dir.iterdir()) and not (output_dir / SUMMARY_FILE).exists())):
        raise ValueError(
            f"refusing to write into {output_dir}: it exists and is not an earlier inspection output "
            f"(no {SUMMARY_FILE}); choose an empty or new folder"
        )


def overlay_size(original: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    height, width = original
    if not max_side or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def classify_flagged(
    bundle: ModelBundle, images: np.ndarray, anomaly_maps: np.ndarray, flagged: np.ndarray
) -> dict[str, np.ndarray] | None:
    """The bundle's defect type of each flagged image (columns of :data:`CLASSIFIER_COLUMNS`,
    empty for the others), or None when the bundle has no classifier."""
    if bundle.classifier is None:
        return None
    count = len(images)
    columns = {
        "pred_defect_type": np.full(count, "", dtype=object),
        "pred_defect_probability": np.full(count, np.nan),
        "runner_up_defect_type": np.full(count, "", dtype=object),
    }
    if flagged.any():
        predicted = bundle.classifier.predict(images[flagged], np.asarray(anomaly_maps)[flagged])
        for name in CLASSIFIER_COLUMNS:
            values = np.asarray(predicted[name])
            if values.shape[0] != int(flagged.sum()):
                raise ValueError(f"the defect classifier returned {values.shape[0]} {name} for {int(flagged.sum())} images")
            columns[name][flagged] = values
    return columns


def inspect_images(
    bundle: ModelBundle,
    inputs: str | Path | Sequence[str | Path],
    output_dir: str | Path,
    *,
    threshold: float | None = None,
    batch_size: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    recursive: bool = True,
    overlays: bool = True,
    overlay_max_side: int | None = 512,
    overlay_alpha: float = 0.5,
    report: bool = True,
    report_thumbnail: int = 128,
    progress: bool = True,
) -> InspectionResult:
    """Score every image under ``inputs`` with ``bundle`` and write the run folder ``output_dir``.

    Each image is brought to the bundle's working size keeping its aspect (cover, then
    centre-crop: a file of the model's aspect is plainly resized, one of another aspect is not
    squeezed, see :func:`fsad_pipeline.data.geometry.fit_to_size`); the overlay shows what was
    scored. ``threshold`` overrides the bundle's calibrated one. The folder is written atomically
    (replacing an earlier inspection output there). Raises :class:`NoImagesError` when no input
    is an image file, or (after writing ``rejects.csv``) when none could be read.
    """
    output_dir = Path(output_dir)
    paths, rejects = collect_image_paths(inputs, recursive=recursive, exclude=output_dir)
    if not paths:
        raise _no_image_files(inputs)
    if threshold is None:
        decision, source = float(bundle.threshold["threshold"]), "model"
    else:
        decision, source = float(threshold), "override"
    if not math.isfinite(decision):
        raise ValueError(f"the threshold must be a finite number, got {decision}")
    _check_output_dir(output_dir)
    ensemble = bundle.ensemble()
    names = list(bundle.fusion.scorers)
    display_range = bundle.fusion.map_display_range()  # the same colours in every overlay
    rows: list[pd.DataFrame] = []
    report_maps: list[np.ndarray] = []  # fused maps at thumbnail size, for report.html
    report_size = capped_size(*bundle.image_size, report_thumbnail)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    with atomic_directory(output_dir) as staging:
        for chunk in iter_scored_chunks(
            ensemble, paths, chunk_size=int(batch_size), max_pixels=int(max_pixels), skip_bad=True,
            progress=progress, desc="inspecting", fit="crop",
        ):
            rejects.extend(chunk.rejects)
            if not len(chunk):
                continue
            scores = np.asarray(chunk.fused["pred_score"], dtype=np.float64)
            labels = (~(scores < decision)).astype(int)  # a NaN score is NG, never OK
            defect = classify_flagged(bundle, chunk.images, chunk.fused["anomaly_map"], labels == 1)
            table = pd.DataFrame(
                {
                    "path": chunk.paths,
                    "verdict": [VERDICTS[int(v)] for v in labels],
                    "pred_label": labels,
                    "pred_score": scores,
                    "threshold": decision,
                    **{f"score_{n}": np.asarray(chunk.per_scorer[n]["pred_score"], np.float64) for n in names},
                    **(defect or {}),
                    "width": [w for _, w in chunk.original_sizes],
                    "height": [h for h, _ in chunk.original_sizes],
                    "overlay": "",
                }
            )
            if overlays:
                files = []
                for row, index in enumerate(chunk.indices):
                    relative = f"{OVERLAY_DIR}/{int(index):05d}_{Path(chunk.paths[row]).stem}.png"
                    caption = f"{table['verdict'].iat[row]} {scores[row]:.3f}"
                    if defect is not None and labels[row] == 1:
                        caption += f" {defect['pred_defect_type'][row]}"
                    image = heatmap_overlay_image(
                        chunk.images[row], chunk.fused["anomaly_map"][row], alpha=float(overlay_alpha),
                        **dict(zip(("vmin", "vmax"), display_range)),
                        size=overlay_size(chunk.original_sizes[row], overlay_max_side), caption=caption,
                    )
                    write_png(staging / relative, image)
                    files.append(relative)
                table["overlay"] = files
            rows.append(table)
            if report:
                fused_maps = np.asarray(chunk.fused["anomaly_map"], np.float32)
                report_maps.extend(ResizedMaps(fused_maps, [report_size] * len(fused_maps)))
        seconds = time.perf_counter() - started
        predictions = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["path", "verdict", "pred_label", "pred_score"])
        rejects_frame = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
        promotion = bundle.promotion or {}
        n_images = int(len(predictions))
        n_ng = int((predictions["pred_label"] == 1).sum()) if n_images else 0
        summary = {
            "model": str(bundle.root),
            "model_resolved": str(bundle.root.resolve()),
            "model_version": promotion.get("version"),
            "backbone": bundle.backbone,
            "image_size": list(bundle.image_size),
            "config_version": bundle.manifest.get("config_version"),
            "scorers": names,
            "threshold": decision,
            "threshold_source": source,
            "threshold_method": bundle.threshold.get("method") if source == "model" else "override",
            "classifier": bundle.classifier is not None,
            "n_images": n_images,
            "n_ng": n_ng,
            "n_ok": n_images - n_ng,
            "n_rejected": int(len(rejects_frame)),
            "seconds": seconds,
            "images_per_second": n_images / seconds if seconds > 0 else float("nan"),
            "started": started_at,
            "files": {"predictions": PREDICTIONS_FILE, "rejects": REJECTS_FILE, "overlays": OVERLAY_DIR if overlays else None,
                      "report": None},
        }
        predictions.to_csv(staging / PREDICTIONS_FILE, index=False)
        rejects_frame.to_csv(staging / REJECTS_FILE, index=False)
        if report and n_images:
            page = render_html_report(
                predictions, np.stack(report_maps), threshold=decision, title="Inspection report",
                map_range=display_range, thumbnail_size=int(report_thumbnail), progress=progress,
            )
            save_html_report(staging / REPORT_FILE, page)
            summary["files"]["report"] = REPORT_FILE
        write_json(staging / SUMMARY_FILE, json.loads(json.dumps(summary, default=float)))
        if n_images == 0 and output_dir.exists():
            # Raised inside the block: the staging folder is dropped and the earlier results stay.
            raise NoImagesError(
                f"none of the {len(paths)} image file(s) could be read ({_reasons(rejects_frame)}); "
                f"the earlier results in {output_dir} are left as they were"
            )
    if n_images == 0:
        raise NoImagesError(
            f"none of the {len(paths)} image file(s) could be read ({_reasons(rejects_frame)}); "
            f"see {output_dir / REJECTS_FILE}"
        )
    logger.info(
        "inspected %d image(s) with model %s: %d NG, %d OK, %d rejected, %.1f s; results in %s",
        n_images, summary["model_version"] or summary["model"], n_ng, n_images - n_ng, len(rejects_frame), seconds,
        output_dir,
    )
    return InspectionResult(predictions, rejects_frame, summary, output_dir)


def _reasons(rejects: pd.DataFrame, limit: int = 3) -> str:
    """The first ``limit`` rejects as ``name: reason`` for an error message."""
    listed = [f"{Path(str(path)).name}: {reason}" for path, reason in rejects[["path", "reason"]].head(limit).itertuples(index=False)]
    more = len(rejects) - len(listed)
    return "; ".join(listed) + (f"; and {more} more" if more > 0 else "")


def run_inspection(
    model_dir: str | Path,
    inputs: str | Path | Sequence[str | Path],
    output_dir: str | Path,
    *,
    expect: dict | None = None,
    device: str = "auto",
    **options,
) -> InspectionResult:
    """Load the bundle at ``model_dir`` (refusing a mismatch with ``expect``) and inspect ``inputs``.

    The one entry point of the ``inference`` pipeline and ``fsad-inspect``; ``options`` go to
    :func:`inspect_images`. Input problems are found before the (slow) model load.
    """
    from fsad_pipeline.model_store.bundle import load_bundle, verify_bundle

    if not collect_image_paths(inputs, recursive=options.get("recursive", True), exclude=output_dir)[0]:
        raise _no_image_files(inputs)
    _check_output_dir(Path(output_dir))
    verify_bundle(model_dir, expect, check_files=False)  # cheap refusal before the checksums and the load
    bundle = load_bundle(model_dir, expect, device=device)
    return inspect_images(bundle, inputs, output_dir, **options)
