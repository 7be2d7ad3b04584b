"""The manifest: one validated row per usable image, and a rejects report for the rest.

Every image is fully decoded once here, so a corrupt, truncated or zero-byte file is found before
anything is trained on it. With ``on_bad_image="skip"`` such files are listed in the rejects report
(path, kind, reason) and the run goes on with the others; with ``"fail"`` the first one stops the
run with a message naming it. Mask problems (missing, wrong size, unreadable) never cost the image:
the image stays, without a mask, and the problem is listed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd
from tqdm.auto import tqdm

from fsad_pipeline.data.images import DEFAULT_MAX_PIXELS, BadImageError, file_sha256, read_image_with_note, read_mask
from fsad_pipeline.data.layouts import ImageRecord

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "split", "label", "defect_type", "mask_path", "width", "height", "sha256", "note"]
REJECT_COLUMNS = ["path", "kind", "reason"]
ON_BAD_IMAGE = ("skip", "fail")


def build_manifest(
    records: Sequence[ImageRecord],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_bad_image: str = "skip",
    mask_threshold: int = 0,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate every record; return (manifest, rejects) data frames."""
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    rows: list[dict] = []
    rejects: list[dict] = []
    for record in tqdm(records, desc="validating images", disable=not progress, leave=False):
        try:
            image, note = read_image_with_note(record.path, max_pixels=max_pixels)
        except BadImageError as error:
            if on_bad_image == "fail":
                raise
            logger.warning("skipping bad image %s", error)
            rejects.append({"path": record.path, "kind": "image", "reason": error.reason})
            continue
        height, width = image.shape[:2]
        mask_path = record.mask_path
        if mask_path:
            try:
                read_mask(mask_path, expected_size=(width, height), threshold=mask_threshold, max_pixels=max_pixels)
            except BadImageError as error:
                if on_bad_image == "fail":
                    raise
                logger.warning("dropping bad mask of %s: %s", record.path, error)
                rejects.append({"path": mask_path, "kind": "mask", "reason": f"{error.reason} (image kept without mask)"})
                mask_path = ""
        elif record.label == 1 and record.masks_expected:
            logger.warning("no mask found for defect image %s", record.path)
            rejects.append({"path": record.path, "kind": "mask", "reason": "mask missing (image kept without mask)"})
        rows.append(
            {
                "path": record.path,
                "split": record.split,
                "label": int(record.label),
                "defect_type": record.defect_type,
                "mask_path": mask_path,
                "width": int(width),
                "height": int(height),
                "sha256": file_sha256(record.path),
                "note": note,
            }
        )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    rejects_frame = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
    if manifest.empty:
        raise ValueError(f"no usable image among {len(records)} files ({len(rejects)} rejected)")
    if not ((manifest["split"] == "train") & (manifest["label"] == 0)).any():
        raise ValueError("no usable good training image left after validation: nothing to learn from")
    converted = int((manifest["note"] != "").sum())
    logger.info(
        "manifest: %d images (%d train, %d test, %d converted), %d rejected",
        len(manifest),
        int((manifest["split"] == "train").sum()),
        int((manifest["split"] == "test").sum()),
        converted,
        len(rejects_frame),
    )
    return manifest, rejects_frame


def manifest_from_parameters(data: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The manifest and rejects of the drop the ``data`` parameters point at (``source``, ``root``,
    ``category``, the source's own options, ``max_pixels``, ``on_bad_image``, ``mask_threshold``);
    the textile data are materialised first when chosen."""
    from fsad_pipeline.data.layouts import discover

    source = data["source"]
    records = discover(source, data["root"], data["category"], **(data.get(source) or {}))
    return build_manifest(
        records,
        max_pixels=int(data["max_pixels"]),
        on_bad_image=data["on_bad_image"],
        mask_threshold=int(data["mask_threshold"]),
    )


def manifest_fingerprint(manifest: pd.DataFrame) -> str:
    """A hash of the manifest's content (paths and file hashes): changes iff the raw data changed."""
    import hashlib

    digest = hashlib.sha256()
    for path, sha in sorted(zip(manifest["path"], manifest["sha256"])):
        digest.update(f"{path}\0{sha}\n".encode())
    return digest.hexdigest()
