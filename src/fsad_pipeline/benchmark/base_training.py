"""Benchmark: memory-bank scorers with a base-trained (leave-one-category-out) encoder vs the plain backbone.

For every target category: train a registration encoder on all the OTHER categories (their good
training images only), register it, then inspect the target with k support images and no
training: the support set is augmented as in the ``memory_bank`` stage, the patch scorers
(kNN memory bank, per-position Gaussian) are fitted on it and score the target's test images.
The same is done with the plain ImageNet backbone. Per k and support round: image and pixel
AUROC; plus base-training minutes and scoring images/s. Parameters come from the project's
``conf/base`` (``--set`` overrides them, OmegaConf dot-list syntax).

    python -m fsad_pipeline.benchmark.base_training --targets grid tire juice_bottle metal_plate textile \
        --ks 2 4 8 --rounds 3 --threads 1

Results: ``<out>/results.json`` and ``<out>/results.md``; encoders in ``<out>/encoders/loo_<target>``;
per-target results are cached in ``<out>/targets/`` (``--reuse`` skips finished targets).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fsad_pipeline.artifacts import json_safe
from fsad_pipeline.benchmark.runs import PROJECT_ROOT, load_parameters
from fsad_pipeline.data.base_data import leave_one_out_split
from fsad_pipeline.data.layouts import discover
from fsad_pipeline.data.sampling import evaluation_set, load_gt_masks, load_images, select_support
from fsad_pipeline.evaluation.metrics import image_auroc, pixel_auroc
from fsad_pipeline.models.base_training import BaseTrainingConfig, train_registration_encoder
from fsad_pipeline.models.features import extract_features
from fsad_pipeline.models.registration import REGISTERED_PREFIX, EncoderConfig
from fsad_pipeline.scoring.dfd_scorer import FeatureConfig
from fsad_pipeline.scoring.patch_scorers import fit_patch_scorers, score_patch_features
from fsad_pipeline.synthesis.support_augmentation import SupportAugmentationConfig, augment_support
from fsad_pipeline.synthesis.textures import TextureBank

SCORERS = ("knn", "gaussian")
logger = logging.getLogger("fsad_pipeline.benchmark.base_training")


def target_sources(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every category that can be a target or a base category: ``{name: {source, root}}``."""
    sources: dict[str, dict[str, Any]] = {}
    root = Path(args.base_root)
    for folder in sorted(p for p in root.iterdir() if (p / "train" / "good").is_dir()):
        sources[folder.name] = {"source": "mvtec", "root": str(root)}
    if args.textile:
        sources["textile"] = {"source": "textile", "root": str(args.textile_root)}
    return sources


def train_leave_one_out(
    target: str, sources: dict[str, dict[str, Any]], params: dict[str, Any], out: Path, threads: int | None
) -> tuple[str, dict[str, Any]]:
    """Train (or reuse) the encoder that never saw ``target``; returns its backbone reference."""
    name = f"loo_{target}"
    directory = out / "encoders" / name
    reference = f"{REGISTERED_PREFIX}{directory.resolve()}"
    if (directory / "encoder.json").is_file():
        info = json.loads((directory / "encoder.json").read_text())
        return reference, info["training"]
    settings = params["base_training"]
    base_sources = [
        {"source": s["source"], "root": s["root"], "categories": [c]} for c, s in sources.items() if c != target
    ]
    split = leave_one_out_split(
        base_sources,
        target=target,
        images_per_category=settings["images_per_category"],
        validation_per_category=int(settings["validation_per_category"]),
        seed=int(params["seed"]),
    )
    config = BaseTrainingConfig.from_dict(
        {**settings["training"], "seed": int(params["seed"]), "device": "cpu", "num_threads": threads}
    )
    encoder_config = EncoderConfig.from_dict({**settings["encoder"], "base": settings["encoder"].get("base") or params["backbone"]})
    images = {
        category: {part: load_images(paths, config.image_size) for part, paths in parts.items()}
        for category, parts in split["categories"].items()
    }
    trained, history = train_registration_encoder(
        images, encoder_config, config, TextureBank.from_parameters(params["synthesis"]["textures"]), name=name
    )
    trained.training.update({"target": target, "history": json_safe(history)})
    trained.save(directory)
    return reference, trained.training


def evaluate_target(
    target: str, source: dict[str, Any], backbones: dict[str, str], params: dict[str, Any], ks: list[int], rounds: int
) -> list[dict[str, Any]]:
    """Scorer AUROCs of each backbone on ``target`` for every k and support round."""
    image_size = int(params["image_size"])
    options = dict(params["data"]["textile"]) if source["source"] == "textile" else {}
    manifest = pd.DataFrame([r.to_dict() for r in discover(source["source"], source["root"], target, **options)])
    test = evaluation_set(manifest)
    labels = test["label"].to_numpy()
    test_images = load_images(test["path"].tolist(), image_size)
    masks, has_mask = load_gt_masks(test["mask_path"].tolist(), labels, image_size)
    pixel_rows = has_mask  # goods, and defects with a mask (textile has none: no pixel AUROC)
    pixels_known = bool(has_mask[labels == 1].any())
    memory_bank = params["memory_bank"]
    augmentation = SupportAugmentationConfig.from_dict(params["support_augmentation"])
    gaussian = {**memory_bank["gaussian"], "enabled": True}
    rows = []
    for label, backbone in backbones.items():
        features = FeatureConfig.from_dict({**memory_bank["features"], "backbone": backbone, "image_size": image_size})
        extractor = features.build_extractor()
        started = time.perf_counter()
        test_features = extract_features(
            extractor, test_images, image_size=image_size, batch_size=features.batch_size, dual_path=False, progress=False
        )
        feature_seconds = time.perf_counter() - started
        for k in ks:
            selection = select_support(manifest, k_shot=k, seed=int(params["seed"]), rounds=rounds)
            for round_index, paths in enumerate(selection["rounds"]):
                support = augment_support(load_images(paths, image_size), augmentation)
                started = time.perf_counter()
                fitted, _ = fit_patch_scorers(
                    support, features, knn=memory_bank["knn"], gaussian=gaussian, anomalous_bank=memory_bank["anomalous_bank"],
                    n_supports=k, seed=int(params["seed"]), progress=False,
                )
                fit_seconds = time.perf_counter() - started
                started = time.perf_counter()
                outputs = score_patch_features(fitted.scorers, test_features, image_size, float(memory_bank["map_sigma"]))
                score_seconds = time.perf_counter() - started
                row = {"target": target, "backbone": label, "k": k, "round": round_index, "fit_seconds": fit_seconds,
                       "images_per_second": len(test_images) / (feature_seconds + score_seconds)}
                for scorer in SCORERS:
                    row[f"{scorer}_image_auroc"] = image_auroc(labels, outputs[scorer]["pred_score"])
                    row[f"{scorer}_pixel_auroc"] = (
                        pixel_auroc(masks[pixel_rows], outputs[scorer]["anomaly_map"][pixel_rows]) if pixels_known else None
                    )
                rows.append(row)
                print(f"[benchmark] {target} {label} k={k} round={round_index}: "
                      f"knn image {row['knn_image_auroc']:.3f} pixel {_fmt(row['knn_pixel_auroc'])}, "
                      f"gaussian image {row['gaussian_image_auroc']:.3f}, {row['images_per_second']:.1f} img/s", flush=True)
        del test_features
    return rows


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _mean_std(values: list[float | None]) -> str:
    clean = [v for v in values if v is not None and np.isfinite(v)]
    if not clean:
        return "n/a"
    return f"{np.mean(clean):.3f} ± {np.std(clean):.3f}"


def markdown(rows: list[dict[str, Any]], training: dict[str, dict[str, Any]]) -> str:
    """Per target and k: plain vs registered, kNN and Gaussian, image and pixel AUROC (mean ± std over rounds)."""
    frame = pd.DataFrame(rows)
    lines = []
    for scorer in SCORERS:
        lines.append(f"\n### {scorer}: image AUROC / pixel AUROC (mean ± std over support rounds)\n")
        lines.append("| target | k | plain image | registered image | Δ image | plain pixel | registered pixel | Δ pixel |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for (target, k), group in frame.groupby(["target", "k"], sort=True):
            cells = [target, str(k)]
            for metric in ("image", "pixel"):
                column = f"{scorer}_{metric}_auroc"
                plain = group[group.backbone == "plain"][column].tolist()
                registered = group[group.backbone == "registered"][column].tolist()
                delta = _delta(plain, registered)
                cells += [_mean_std(plain), _mean_std(registered), delta]
            lines.append("| " + " | ".join(cells) + " |")
        for k, group in frame.groupby("k", sort=True):
            cells = ["**mean**", str(k)]
            for metric in ("image", "pixel"):
                column = f"{scorer}_{metric}_auroc"
                per_target = group.groupby(["target", "backbone"])[column].mean().unstack()
                plain, registered = per_target.get("plain"), per_target.get("registered")
                cells += [
                    _fmt(plain.mean()) if plain is not None else "n/a",
                    _fmt(registered.mean()) if registered is not None else "n/a",
                    _fmt((registered - plain).mean(), 3) if plain is not None and registered is not None else "n/a",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("\n### base training and scoring speed\n")
    lines.append("| target | base-training minutes | selected epoch | plain img/s | registered img/s |")
    lines.append("|---|---|---|---|---|")
    for target, info in sorted(training.items()):
        speed = frame[frame.target == target].groupby("backbone")["images_per_second"].mean()
        lines.append(
            f"| {target} | {info.get('seconds', float('nan')) / 60:.1f} | {info.get('selected_epoch')} | "
            f"{_fmt(speed.get('plain'), 1)} | {_fmt(speed.get('registered'), 1)} |"
        )
    return "\n".join(lines) + "\n"


def _delta(plain: list, registered: list) -> str:
    a = [v for v in plain if v is not None and np.isfinite(v)]
    b = [v for v in registered if v is not None and np.isfinite(v)]
    if not a or not b:
        return "n/a"
    return f"{np.mean(b) - np.mean(a):+.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-root", type=Path, default=PROJECT_ROOT.parent / "shared" / "data" / "base_categories")
    parser.add_argument("--textile-root", type=Path, default=PROJECT_ROOT / "data" / "01_raw")
    parser.add_argument("--no-textile", dest="textile", action="store_false", help="leave the textile data out")
    parser.add_argument("--targets", nargs="+", default=None, help="default: every category found")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="parameter overrides, a.b.c=value")
    parser.add_argument("--conf", type=Path, default=PROJECT_ROOT / "conf" / "base")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "08_reporting" / "benchmark_base_training")
    parser.add_argument("--reuse", action="store_true", help="skip targets whose results exist in <out>/targets/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_parameters(args.conf, args.overrides)
    sources = target_sources(args)
    targets = args.targets or list(sources)
    (args.out / "targets").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    training: dict[str, dict[str, Any]] = {}
    for target in targets:
        cached = args.out / "targets" / f"{target}.json"
        if args.reuse and cached.is_file():
            payload = json.loads(cached.read_text())
        else:
            print(f"[benchmark] {target}: base training on {[c for c in sources if c != target]}", flush=True)
            reference, info = train_leave_one_out(target, sources, params, args.out, args.threads)
            print(f"[benchmark] {target}: encoder {reference}, {info['seconds'] / 60:.1f} min, "
                  f"selected epoch {info['selected_epoch']}", flush=True)
            backbones = {"plain": params["backbone"], "registered": reference}
            payload = {"training": info, "rows": evaluate_target(target, sources[target], backbones, params, args.ks, args.rounds)}
            cached.write_text(json.dumps(json_safe(payload), indent=2))
        rows += payload["rows"]
        training[target] = payload["training"]
        table = markdown(rows, training)
        (args.out / "results.md").write_text(table)
        (args.out / "results.json").write_text(json.dumps(json_safe({"params": args.overrides, "rows": rows, "training": training}), indent=2))
    print(markdown(rows, training))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
