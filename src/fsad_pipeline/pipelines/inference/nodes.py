"""Thin node over ``fsad_pipeline.inspection.inspector`` (the same call as ``fsad-inspect``)."""

from __future__ import annotations

from fsad_pipeline.inspection.inspector import run_inspection


def inspect_new_images(
    inference: dict, data: dict, backbone: str, image_size: int | list, config_version: int, device: str
) -> dict:
    """Score ``inference.inputs`` with the bundle at ``inference.model_dir``; returns the run summary.

    The run folder (``inference.output_dir``) is written by the core, not the catalog: each
    run scores other images with a model from the mutable champion store, so it is no
    reproducible DVC stage.
    """
    result = run_inspection(
        inference["model_dir"],
        inference["inputs"],
        inference["output_dir"],
        expect={"backbone": backbone, "image_size": image_size, "config_version": int(config_version)},
        device=device,
        threshold=inference.get("threshold"),
        batch_size=int(inference["batch_size"]),
        max_pixels=int(data["max_pixels"]),
        recursive=bool(inference.get("recursive", True)),
        overlays=bool(inference.get("overlays", True)),
        overlay_max_side=inference.get("overlay_max_side"),
        overlay_alpha=float(inference.get("overlay_alpha", 0.5)),
    )
    return result.summary
