"""Benchmark: few-shot defect-type classification, the classifier against both baselines.

For every category and seed: draw ``k`` support normals (as the pipeline does), build the normal
memory bank from their augmentations (the ``memory_bank`` stage's recipe), pretrain the residual
encoder on pseudo defect classes pasted on the normals, then for every ``k_defect_shots``: take
that many labelled defect images per type from the test set, fine-tune and fit the classifier
and the two nearest-prototype baselines on them, and classify every *other* test defect (ground
truth defects, so the accuracy is about the type, not about detection). Reported per method:
accuracy, accuracy per type and its mean over types (closed set: the argmax type), the open-set
accuracy (an ``unknown`` counts as wrong) and how often ``unknown`` is said, pretraining seconds
and classification images/s (features, residuals and the three methods together). An open-set check leaves each type out of the prototypes in turn
and measures how often its images are called ``unknown`` (the pretrained encoder, not the
fine-tuned one, so the left-out type was never seen).

    python -m fsad_pipeline.benchmark.defect_types --categories textile tire grid --shots 1 2 4 --seeds 0 1 2

Results: ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fsad_pipeline.benchmark.runs import PROJECT_ROOT, load_parameters
from fsad_pipeline.classification.defect_types import CLASSIFIER, METHODS, DefectTypeConfig, fit_on_shots, pretrain_residual_encoder
from fsad_pipeline.data.layouts import discover
from fsad_pipeline.data.sampling import load_images, select_defect_shots, select_support
from fsad_pipeline.evaluation.metrics import defect_type_accuracy
from fsad_pipeline.models.defect_classifier import PooledEmbedder, PrototypeClassifier, residual_features
from fsad_pipeline.models.features import extract_features
from fsad_pipeline.models.memory_bank import MemoryBankScorer
from fsad_pipeline.scoring.dfd_scorer import FeatureConfig
from fsad_pipeline.synthesis.support_augmentation import SupportAugmentationConfig, augment_support
from fsad_pipeline.synthesis.textures import TextureBank

logger = logging.getLogger("fsad_pipeline.benchmark.defect_types")


def category_manifest(name: str, args: argparse.Namespace, params: dict[str, Any]) -> pd.DataFrame:
    """The category's image records (textile: the pipeline's fixed split, else an MVTec layout)."""
    if name == "textile":
        records = discover("textile", args.textile_root, "textile", **(params["data"].get("textile") or {}))
    else:
        records = discover("mvtec", args.base_root, name)
    return pd.DataFrame([record.to_dict() for record in records])


def _open_set_check(encoder, shot_residuals, shot_types, eval_residuals, eval_types, options) -> dict[str, float]:
    """Leave each type out of the prototypes: how often its images, and the others, are ``unknown``."""
    names = sorted(set(shot_types))
    if len(names) < 3:  # one known type left: no class-out calibration, nothing meaningful to measure
        return {}
    new_flagged, known_flagged = [], []
    for left_out in names:
        keep = np.array([t != left_out for t in shot_types])
        classifier = PrototypeClassifier(encoder, **options).fit(shot_residuals[torch.from_numpy(keep)], list(np.array(shot_types)[keep]))
        unknown = classifier.predict(eval_residuals).is_unknown
        is_new = np.array([t == left_out for t in eval_types])
        new_flagged.append(float(unknown[is_new].mean()) if is_new.any() else np.nan)
        known_flagged.append(float(unknown[~is_new].mean()) if (~is_new).any() else np.nan)
    return {"new_type_unknown_rate": float(np.nanmean(new_flagged)), "known_type_unknown_rate": float(np.nanmean(known_flagged))}


def evaluate_category(name: str, args: argparse.Namespace, params: dict[str, Any]) -> list[dict[str, Any]]:
    manifest = category_manifest(name, args, params)
    image_size = int(params["image_size"])
    bank_params = params["memory_bank"]
    features = FeatureConfig.from_dict(
        {**bank_params["features"], "backbone": bank_params.get("backbone") or params["backbone"], "image_size": image_size}
    )
    config = DefectTypeConfig.from_dict(params["classification"])
    device = args.device
    common = dict(image_size=image_size, batch_size=features.batch_size, device=device, dual_path=False, progress=False)
    extractor = features.build_extractor()
    textures = TextureBank.from_parameters({**params["synthesis"]["textures"], "dtd_root": args.dtd_root})
    defects = manifest[(manifest["split"] == "test") & (manifest["label"] == 1)].sort_values("path").reset_index(drop=True)
    started = time.perf_counter()
    defect_features = extract_features(extractor, load_images(defects["path"].tolist(), image_size), **common)
    feature_seconds_per_image = (time.perf_counter() - started) / max(1, len(defects))
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        support_paths = select_support(manifest, k_shot=args.k_normals, seed=seed)["rounds"][0]
        support = load_images(support_paths, image_size)
        views = support if args.no_augment else augment_support(support, SupportAugmentationConfig.from_dict(params["support_augmentation"]))
        bank = MemoryBankScorer(**bank_params["knn"], seed=seed, progress=False).fit(extract_features(extractor, views, **common))
        encoder, pretrain_info = pretrain_residual_encoder(support, textures, extractor, features, config, seed=seed, device=device, progress=False)
        residuals = residual_features(defect_features, bank)
        print(f"[benchmark] {name} seed {seed}: bank {bank.index.size}, pretrain {pretrain_info['pretrain']['steps']} episodes "
              f"{pretrain_info['pretrain']['seconds']:.0f} s", flush=True)
        for shots in args.shots:
            chosen = select_defect_shots(manifest, k_defect_shots=shots, seed=seed)["shots"]
            shot_paths = {path for paths in chosen.values() for path in paths}
            is_shot = defects["path"].isin(shot_paths).to_numpy()
            shot_rows, eval_rows = torch.from_numpy(np.flatnonzero(is_shot)), torch.from_numpy(np.flatnonzero(~is_shot))
            if set(defects["path"][is_shot]) & set(defects["path"][~is_shot]):
                raise AssertionError("a defect shot is in the evaluation set")
            shot_types = defects["defect_type"][is_shot].tolist()
            eval_types = defects["defect_type"][~is_shot].tolist()
            fitted = fit_on_shots(encoder, defect_features[shot_rows], shot_types, bank, features, config, seed=seed, device=device, progress=False)
            started = time.perf_counter()
            predictions = fitted.classify(defect_features[eval_rows])
            classify_seconds = time.perf_counter() - started
            options = dict(temperature=config.temperature, open_set=True, unknown_margin=config.unknown_margin)
            open_set = {
                CLASSIFIER: _open_set_check(copy.deepcopy(encoder), residuals[shot_rows], shot_types, residuals[eval_rows], eval_types, options),
                "residual_prototype": _open_set_check(
                    PooledEmbedder(pooling=config.baseline_pooling), residuals[shot_rows], shot_types, residuals[eval_rows], eval_types, options
                ),
            }
            for method in METHODS:
                prediction = predictions[method]
                closed = defect_type_accuracy(eval_types, prediction.closed_set_type)
                opened = defect_type_accuracy(eval_types, prediction.pred_type)
                rows.append({
                    "category": name, "seed": seed, "k_defect_shots": shots, "method": method, "n_eval": len(eval_types),
                    "accuracy": closed["accuracy"], "mean_type_accuracy": closed["mean_type_accuracy"],
                    "per_type": closed["per_type"], "open_set_accuracy": opened["accuracy"],
                    "unknown_rate": opened["unknown_rate"], **open_set.get(method, {}),
                    "pretrain_seconds": pretrain_info["pretrain"]["seconds"] if method == CLASSIFIER else 0.0,
                    "pretrain_episodes": pretrain_info["pretrain"]["steps"] if method == CLASSIFIER else 0,
                    "fine_tune": fitted.info["fine_tune"] if method == CLASSIFIER else None,
                    # features + residuals + all three methods, per image
                    "classify_images_per_second": len(eval_types) / (classify_seconds + feature_seconds_per_image * len(eval_types)),
                })
                print(f"[benchmark] {name} seed {seed} shots {shots} {method:18s} acc {closed['accuracy']:.3f} "
                      f"mean/type {closed['mean_type_accuracy']:.3f} unknown {opened['unknown_rate']:.2f}", flush=True)
    return rows


def _mean_std(values: pd.Series) -> str:
    values = values.dropna()
    return "–" if values.empty else f"{values.mean():.3f} ± {values.std(ddof=0):.3f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """One row per category, k_defect_shots and method: mean ± std over seeds."""
    frame = pd.DataFrame(rows)
    lines = [
        "| category | k_defect_shots | method | accuracy | mean over types | open-set accuracy | unknown rate | "
        "new type → unknown | known type → unknown | pretrain s | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (category, shots, method), group in frame.groupby(["category", "k_defect_shots", "method"], sort=False):
        new_type = group["new_type_unknown_rate"] if "new_type_unknown_rate" in group else pd.Series(dtype=float)
        known_type = group["known_type_unknown_rate"] if "known_type_unknown_rate" in group else pd.Series(dtype=float)
        lines.append(
            f"| {category} | {shots} | {method} | {_mean_std(group['accuracy'])} | {_mean_std(group['mean_type_accuracy'])} | "
            f"{_mean_std(group['open_set_accuracy'])} | {_mean_std(group['unknown_rate'])} | {_mean_std(new_type)} | "
            f"{_mean_std(known_type)} | {group['pretrain_seconds'].mean():.0f} | {group['classify_images_per_second'].mean():.1f} |"
        )
    per_type = []
    for (category, shots, method), group in frame.groupby(["category", "k_defect_shots", "method"], sort=False):
        types = pd.DataFrame(list(group["per_type"]))
        per_type.append(f"| {category} | {shots} | {method} | " + ", ".join(f"{t} {types[t].mean():.2f}" for t in types.columns) + " |")
    return "\n".join(lines + ["", "| category | k_defect_shots | method | accuracy per type (mean over seeds) |", "|---|---|---|---|", *per_type]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=["textile", "tire", "grid"])
    parser.add_argument("--base-root", type=Path, default=PROJECT_ROOT.parent / "shared" / "data" / "base_categories")
    parser.add_argument("--textile-root", type=Path, default=PROJECT_ROOT / "data" / "01_raw")
    parser.add_argument("--dtd-root", default=None, help="DTD-layout texture folder (one pseudo class per class folder); default: the built-in bank")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4], help="k_defect_shots values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k-normals", type=int, default=4, help="support normals (bank and pseudo classes)")
    parser.add_argument("--no-augment", action="store_true", help="bank from the raw normals, not their augmentations")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="parameter overrides, a.b.c=value")
    parser.add_argument("--conf", type=Path, default=PROJECT_ROOT / "conf" / "base")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "08_reporting" / "benchmark_defect_types")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_parameters(args.conf, args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for category in args.categories:
        rows += evaluate_category(category, args, params)
        (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
        (args.out / "results.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
