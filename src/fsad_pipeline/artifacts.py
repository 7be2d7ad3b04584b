"""Saving and loading artifacts in safe formats (PNG, CSV, JSON, ``.npy`` without pickle).

Directory artifacts are written to a temporary sibling and swapped in with a rename, so a crash
never leaves a half-written artifact where a later stage (or the inference path) would read it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import pandas as pd

from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """This process's umask: from ``/proc/self/status`` where Linux has it (changing the umask to
    read it, the only other way, would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    # mkdtemp makes the folder 0700 whatever the umask; the swapped-in artifact must get the
    # mode any folder made here gets (a service under another account reads the champion).
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        yield staging
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(target, backup)
        os.replace(staging, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write a text file atomically (temp file + rename): readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding=encoding)
    os.replace(tmp, path)


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def json_safe(value: Any) -> Any:
    """A JSON-safe copy of nested dicts/lists: NaN and infinities (an undefined AUROC, a loss
    before training) become null, which strict JSON readers accept."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _write_png(path: Path, image: np.ndarray) -> None:
    array = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 RGB (H, W, 3) or grey (H, W) image as PNG, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_png(path, np.ascontiguousarray(image))


def _read_png(path: Path, color: bool) -> np.ndarray:
    flag = cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE
    array = cv2.imread(str(path), flag)
    if array is None:
        raise OSError(f"could not read {path}")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if color else array


def save_sample_set(directory: str | Path, samples: PseudoAnomalySet) -> None:
    """Write a pseudo-anomaly set as PNG files plus ``samples.csv`` (index, label, source_index,
    defect_shot, mask_known, family, view).

    Layout: ``normals/NNNNN.png`` (rotated clean image), ``images/NNNNN.png`` (augmented image),
    ``masks/NNNNN.png`` (0/255), so a person can browse them.
    """
    samples.validate()
    with atomic_directory(directory) as staging:
        for name in ("normals", "images", "masks"):
            (staging / name).mkdir()
        for index in range(len(samples)):
            stem = f"{index:05d}.png"
            _write_png(staging / "normals" / stem, samples.normals[index])
            _write_png(staging / "images" / stem, samples.images[index])
            _write_png(staging / "masks" / stem, samples.masks[index].astype(np.uint8) * 255)
        pd.DataFrame(
            {
                "index": np.arange(len(samples)),
                "label": samples.labels,
                "source_index": samples.source_index,
                "defect_shot": samples.defect_shot,
                "mask_known": samples.mask_known.astype(int),
                "family": samples.family,
                "view": samples.view,
            }
        ).to_csv(staging / "samples.csv", index=False)


def load_sample_set(directory: str | Path) -> PseudoAnomalySet:
    directory = Path(directory)
    table = pd.read_csv(directory / "samples.csv")
    stems = [f"{int(i):05d}.png" for i in table["index"]]
    samples = PseudoAnomalySet(
        normals=np.stack([_read_png(directory / "normals" / s, True) for s in stems]),
        images=np.stack([_read_png(directory / "images" / s, True) for s in stems]),
        masks=np.stack([(_read_png(directory / "masks" / s, False) > 127).astype(np.uint8) for s in stems]),
        labels=table["label"].to_numpy(dtype=np.int64),
        source_index=table["source_index"].to_numpy(dtype=np.int64),
        defect_shot=table["defect_shot"].to_numpy(dtype=np.int64) if "defect_shot" in table else None,
        mask_known=table["mask_known"].to_numpy(dtype=bool) if "mask_known" in table else None,
        family=table["family"].to_numpy(dtype=str) if "family" in table else None,  # absent: derived
        view=table["view"].to_numpy(dtype=str) if "view" in table else None,  # absent: all "original"
    )
    samples.validate()
    return samples


def save_array(path: str | Path, array: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, np.asarray(array), allow_pickle=False)
    os.replace(tmp, path)


def load_array(path: str | Path) -> np.ndarray:
    return np.load(Path(path), allow_pickle=False)


def save_nested_arrays(path: str | Path, arrays: dict[str, dict[str, np.ndarray]]) -> None:
    """``{group: {name: array}}`` as one ``.npz`` (keys ``group/name``; numeric arrays only, no pickle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{group}/{name}": np.asarray(value) for group, values in arrays.items() for name, value in values.items()}
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load_nested_arrays(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    nested: dict[str, dict[str, np.ndarray]] = {}
    with np.load(Path(path), allow_pickle=False) as data:
        for key in data.files:
            group, name = key.split("/", 1)
            nested.setdefault(group, {})[name] = data[key]
    return nested
