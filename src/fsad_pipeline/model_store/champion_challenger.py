"""Champion vs challenger on one frozen validation set, and the lock that serialises retraining.

The scheduled retraining job (:mod:`fsad_pipeline.retrain`) retrains on new data, then asks two
questions this module answers without Kedro or DVC:

* how do the champion and the challenger bundle score the *same* frozen validation set
  (the synthetic split plus augmented labelled defects of the first champion's run, frozen in
  the model store when a model is first promoted and never replaced, so every later comparison
  uses identical images, resized to each model's working size when they differ)?
* is the challenger not worse (image AUROC ≥ champion's − ``tolerance``)?

Caveat, said in the decision record: the frozen set is synthetic (plus any labelled defects), and
the model that was calibrated on it has a home advantage; when both saturate at AUROC 1.0 the
comparison cannot separate them and the challenger (fresher data) is promoted.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fsad_pipeline.artifacts import load_sample_set, read_json, save_sample_set, write_json
from fsad_pipeline.evaluation.metrics import image_auroc
from fsad_pipeline.model_store.bundle import load_bundle
from fsad_pipeline.scoring.ensemble import score_in_chunks
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet

FROZEN_VALIDATION_DIR = "frozen_validation"
FROZEN_RECORD = "frozen.json"
RETRAIN_LOCK = ".retrain.lock"


class RetrainBusy(RuntimeError):
    """Another retraining run holds the lock."""


def load_frozen_validation(store_root: str | Path) -> PseudoAnomalySet | None:
    """The store's frozen validation set, or None when none has been frozen yet."""
    folder = Path(store_root) / FROZEN_VALIDATION_DIR
    return load_sample_set(folder) if (folder / "samples.csv").is_file() else None


def freeze_validation(store_root: str | Path, validation: PseudoAnomalySet, *, source: str) -> bool:
    """Freeze ``validation`` as the store's comparison set unless one is frozen already.

    Called at the first promotion (the champion's own validation set) and never overwrites: a
    frozen set only changes when a person deletes ``<store>/frozen_validation/``. ``source``
    (what the set was made from) is kept in ``frozen.json``. Returns whether it froze now.
    """
    folder = Path(store_root) / FROZEN_VALIDATION_DIR
    if (folder / "samples.csv").is_file():
        return False
    save_sample_set(folder, validation)
    write_json(folder / FROZEN_RECORD, {"frozen_at": datetime.now(timezone.utc).isoformat(), "source": source,
                                        "images": int(len(validation)), "anomalous": int(validation.labels.sum()),
                                        "image_size": list(validation.images.shape[1:3])})
    return True


def frozen_validation_record(store_root: str | Path) -> dict:
    """``frozen.json`` of the store's frozen set (empty for sets frozen before it was written)."""
    path = Path(store_root) / FROZEN_VALIDATION_DIR / FROZEN_RECORD
    return read_json(path) if path.is_file() else {}


def validation_at_size(validation: PseudoAnomalySet, image_size: tuple[int, int]) -> PseudoAnomalySet:
    """The set brought to a model's working size (H, W): every image resized whole (no crop could
    cut a defect out of its own row), each mask area-resized and kept where any defect pixel
    falls, so every anomalous row keeps a defect. The same set at the same size is returned as
    is. A model trained at another size is compared on the *same* images resized, never on a
    set frozen anew."""
    import cv2

    from fsad_pipeline.data.images import resize_image

    size = tuple(int(v) for v in image_size)
    if tuple(validation.images.shape[1:3]) == size:
        return validation
    height, width = size

    def images(stack: np.ndarray) -> np.ndarray:
        return np.stack([resize_image(image, size) for image in stack]) if len(stack) else np.zeros((0, *size, 3), stack.dtype)

    def masks(stack: np.ndarray) -> np.ndarray:
        resized = [cv2.resize(m.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA) > 0 for m in stack]
        return np.stack(resized).astype(stack.dtype) if resized else np.zeros((0, *size), stack.dtype)

    return replace(validation, images=images(validation.images), normals=images(validation.normals),
                   masks=masks(validation.masks)).validate()


def bundle_validation_auroc(bundle_dir: str | Path, validation: PseudoAnomalySet, *, device: str = "cpu") -> dict:
    """Fused image AUROC (and the mean normal / anomalous score) of a bundle on a validation set
    (brought to the bundle's working size first, see :func:`validation_at_size`)."""
    bundle = load_bundle(bundle_dir, device=device)
    ensemble = bundle.ensemble()
    validation = validation_at_size(validation, tuple(bundle.image_size))
    outputs = score_in_chunks(ensemble, validation.images)
    scores = bundle.fusion.fuse(outputs)["pred_score"]
    labels = validation.labels
    auroc = image_auroc(labels, scores)
    return {
        "image_auroc": None if np.isnan(auroc) else auroc,
        "mean_score_normal": float(np.mean(scores[labels == 0])) if (labels == 0).any() else None,
        "mean_score_anomalous": float(np.mean(scores[labels == 1])) if (labels == 1).any() else None,
        "images": int(len(labels)),
    }


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(challenger: dict, champion: dict | None, *, tolerance: float = 0.0) -> Decision:
    """Promote when there is no champion, or the challenger's AUROC is not below the champion's by more than ``tolerance``."""
    if champion is None:
        return Decision(True, "no champion yet")
    new, old = challenger.get("image_auroc"), champion.get("image_auroc")
    if new is None:
        return Decision(False, "the challenger's validation AUROC is undefined (one class only)")
    if old is None:
        return Decision(True, "the champion's validation AUROC is undefined")
    if new + tolerance >= old:
        return Decision(True, f"challenger {new:.4f} is not worse than champion {old:.4f} (tolerance {tolerance})")
    return Decision(False, f"challenger {new:.4f} is worse than champion {old:.4f} (tolerance {tolerance})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: An empty or unreadable lock older than this is a run that died before writing its pid.
UNREADABLE_LOCK_STALE_SECONDS = 60.0


def _age_seconds(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


@contextmanager
def retrain_lock(store_root: str | Path) -> Iterator[Path]:
    """An exclusive lock file (O_EXCL) holding pid and host; a lock left by a dead process is taken over."""
    root = Path(store_root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / RETRAIN_LOCK
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except OSError as error:
            if error.errno != errno.EEXIST:
                raise
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            same_host = holder.get("host") == socket.gethostname()
            if same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            if not holder and _age_seconds(path) > UNREADABLE_LOCK_STALE_SECONDS:
                path.unlink(missing_ok=True)  # stale: a run died between creating the lock and writing it
                continue
            raise RetrainBusy(
                f"another retraining run holds {path} ({holder or 'unreadable lock'}); if no retraining is running "
                "(a lock from another host or container cannot be checked from here), delete that file"
            ) from None
    else:
        raise RetrainBusy(f"could not take {path}")
    try:
        os.write(handle, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        os.close(handle)
        yield path
    finally:
        path.unlink(missing_ok=True)
