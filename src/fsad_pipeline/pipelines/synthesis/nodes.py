"""Thin nodes over ``fsad_pipeline.synthesis``."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fsad_pipeline.data.geometry import as_hw
from fsad_pipeline.data.sampling import load_images, unseen_good_paths
from fsad_pipeline.evaluation.figures import pseudo_anomaly_examples_figure
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet, build_pseudo_anomaly_set, build_unseen_validation_set
from fsad_pipeline.synthesis.defect_families import FamilyConfig, family_example_rows
from fsad_pipeline.synthesis.foreground import foreground_mask
from fsad_pipeline.synthesis.textures import TextureBank

logger = logging.getLogger(__name__)

#: Independent random streams derived from the one project seed.
TRAIN_STREAM, VALIDATION_STREAM = 1, 2
#: Where the validation's images come from (``synthesis.validation.base``).
VALIDATION_BASES = ("auto", "unseen", "supports")


def load_support_images(support_selection: dict, image_size: int, data: dict) -> np.ndarray:
    """The first support round's images at training resolution, (k, H, W, 3) uint8."""
    return load_images(support_selection["rounds"][0], image_size, max_pixels=int(data["max_pixels"]))


def build_texture_bank(textures: dict) -> TextureBank:
    return TextureBank.from_parameters(textures)


def compute_foreground_masks(support_images: np.ndarray, method: str) -> np.ndarray:
    return np.stack([foreground_mask(image, method=method) for image in support_images])


def _family_config(recipe: dict) -> FamilyConfig:
    """``recipe``'s families; the ``perlin`` family defaults to the recipe's own DFD paste."""
    family_params = dict(recipe.get("family_params") or {})
    perlin = {
        "beta_range": recipe["beta_range"], "perlin": dict(recipe["perlin"]), "texture_ops": recipe["texture_ops"]
    }
    family_params["perlin"] = {**perlin, **(family_params.get("perlin") or {})}
    return FamilyConfig.from_dict({**recipe, "family_params": family_params})


def _build_set(support_images, foreground_masks, textures, recipe: dict, n_per_image: int, rng) -> PseudoAnomalySet:
    if recipe.get("families"):
        return build_pseudo_anomaly_set(
            support_images, n_per_image, rng, textures, foreground_masks=foreground_masks,
            families=_family_config(recipe), anomaly_probability=recipe["anomaly_probability"],
        )
    return build_pseudo_anomaly_set(
        support_images,
        n_per_image,
        rng,
        textures,
        foreground_masks=foreground_masks,
        anomaly_probability=recipe["anomaly_probability"],
        beta_range=tuple(recipe["beta_range"]),
        rotation_range=(-float(recipe["max_rotation_deg"]), float(recipe["max_rotation_deg"])),
        perlin_kwargs=dict(recipe["perlin"]),
        augment_ops=recipe["texture_ops"],
    )


def synthesize_training_set(
    support_images: np.ndarray, foreground_masks: np.ndarray, textures: TextureBank, synthesis: dict, seed: int
) -> PseudoAnomalySet:
    rng = np.random.default_rng([int(seed), TRAIN_STREAM])
    return _build_set(support_images, foreground_masks, textures, synthesis, synthesis["n_per_image"], rng)


def load_validation_images(
    manifest: pd.DataFrame,
    support_selection: dict,
    image_size,
    data: dict,
    synthesis: dict,
    fusion: dict,
    threshold: dict,
    seed: int,
) -> np.ndarray:
    """The good images the validation is made from, (n, H, W, 3) uint8; none (n = 0): the supports.

    ``synthesis.validation.base``: ``unseen`` / ``auto`` take the fusion's draw of the support
    pool's unseen good images (``fusion.unseen_normals``; never a support, never a test image,
    disjoint from the threshold's calibration images: :func:`unseen_good_paths`); ``auto`` falls
    back to the supports when the pool gives fewer than ``validation.min_unseen_images``, and
    ``supports`` always makes the validation from the supports (held out by leave-one-support-out
    banks and a cross-fitted DFD instead).
    """
    validation = synthesis["validation"]
    base = str(validation.get("base", "auto"))
    if base not in VALIDATION_BASES:
        raise ValueError(f"synthesis.validation.base must be one of {VALIDATION_BASES}, got {base!r}")
    none = np.zeros((0, *as_hw(image_size), 3), np.uint8)
    if base == "supports":
        return none
    _, paths = unseen_good_paths(
        manifest, support_selection, calibration=int(threshold.get("calibration_images", 0)),
        fusion=int(fusion.get("unseen_normals", 0)), seed=int(seed),
    )
    minimum = int(validation.get("min_unseen_images", 1))
    if len(paths) < minimum:
        message = (f"validation: {len(paths)} unseen good images in the support pool (fewer than "
                   f"synthesis.validation.min_unseen_images = {minimum})")
        if base == "unseen":
            raise ValueError(message)
        logger.info("%s: the validation is made from the supports", message)
        return none
    logger.info("validation: made from %d unseen good images of the support pool", len(paths))
    return load_images(paths, as_hw(image_size), max_pixels=int(data["max_pixels"]))


def synthesize_validation_set(
    support_images: np.ndarray,
    foreground_masks: np.ndarray,
    textures: TextureBank,
    synthesis: dict,
    seed: int,
    validation_images: np.ndarray | None = None,
) -> PseudoAnomalySet:
    """The recipe with its own seed and the overrides of ``synthesis.validation`` (its defect families).

    With ``validation_images`` (unseen good images, :func:`load_validation_images`) the split is
    made from them (each once as it is, then ``validation.unseen_defects_per_image`` defects
    on it), else from the supports (``validation.n_per_image`` rows each).
    """
    recipe = {**synthesis, **synthesis["validation"]}
    rng = np.random.default_rng([int(seed), VALIDATION_STREAM])
    if validation_images is None or not len(validation_images):
        return _build_set(support_images, foreground_masks, textures, recipe, recipe["n_per_image"], rng)
    return build_unseen_validation_set(
        validation_images, int(recipe.get("unseen_defects_per_image", 2)), rng, textures,
        _family_config({**recipe, "families": recipe.get("families") or {"perlin": 1.0}}),
        foreground=recipe.get("foreground", "auto"),
    )


def plot_pseudo_anomaly_examples(samples: PseudoAnomalySet, n_examples: int) -> Figure:
    return pseudo_anomaly_examples_figure(
        samples.images, samples.masks, samples.labels, normals=samples.normals, n_max=int(n_examples)
    )


def plot_family_examples(samples: PseudoAnomalySet, n_examples: int) -> Figure:
    """Examples of every defect family in ``samples`` in turn (then one normal), family named per row."""
    rows = family_example_rows(samples.family, int(n_examples))
    titles = ["0" if samples.labels[r] == 0 else f"1, {samples.family[r]}" for r in rows]
    return pseudo_anomaly_examples_figure(
        samples.images[rows], samples.masks[rows], titles, normals=samples.normals[rows], n_max=len(rows)
    )
