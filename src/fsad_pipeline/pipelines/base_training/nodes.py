"""Thin nodes over ``fsad_pipeline.data.base_data`` and ``fsad_pipeline.models.base_training``."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from fsad_pipeline.artifacts import json_safe
from fsad_pipeline.data.base_data import leave_one_out_split
from fsad_pipeline.data.sampling import load_images
from fsad_pipeline.evaluation.figures import training_history_figure
from fsad_pipeline.models.base_training import BaseTrainingConfig, TrainedEncoder, train_registration_encoder
from fsad_pipeline.models.registration import REGISTERED_PREFIX, EncoderConfig
from fsad_pipeline.synthesis.textures import TextureBank


def select_base_images(base_training: dict, data: dict, seed: int) -> dict:
    """The leave-one-category-out split: the project's category (or ``base_training.target``) is left out."""
    target = base_training.get("target") or data["category"]
    # The project's own category folder is left out too (it may sit under a base root by another name).
    target_dir = Path(data["root"]) / data["category"] if target == data["category"] else None
    return leave_one_out_split(
        base_training["sources"],
        target=target,
        target_dir=target_dir,
        images_per_category=base_training["images_per_category"],
        validation_per_category=int(base_training["validation_per_category"]),
        seed=int(seed),
    )


def train_base_encoder(
    base_split: dict, base_training: dict, backbone: str, synthesis: dict, seed: int, device: str
) -> tuple[TrainedEncoder, dict, Figure]:
    torch.use_deterministic_algorithms(True, warn_only=True)
    config = BaseTrainingConfig.from_dict({**base_training["training"], "seed": int(seed), "device": device})
    encoder_config = EncoderConfig.from_dict({**base_training["encoder"], "base": base_training["encoder"].get("base") or backbone})
    size = int(config.image_size)
    categories = {
        name: {part: load_images(paths, size) for part, paths in parts.items()}
        for name, parts in base_split["categories"].items()
    }
    trained, history = train_registration_encoder(
        categories, encoder_config, config, TextureBank.from_parameters(synthesis["textures"]), name=base_training["name"]
    )
    trained.training["target"] = base_split["target"]
    summary = {
        "name": trained.name,
        "backbone": f"{REGISTERED_PREFIX}{trained.name}",
        "base_backbone": encoder_config.base,
        "target": base_split["target"],
        "minutes": trained.training["seconds"] / 60.0,
        "selected_epoch": trained.training["selected_epoch"],
        "history": json_safe(history),
    }
    return trained, summary, training_history_figure(history)
