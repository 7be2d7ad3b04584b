"""Champion vs challenger on one frozen validation set, and the lock that serialises retraining.

The scheduled retraining job (:mod:`fsad_pipeline.retrain`) retrains on new data, then asks two
questions this module answers without Kedro or DVC:

* how do the champion and the challenger bundle score the *same* frozen validation set
  (the synthetic split plus augmented labelled defects, frozen in the model store the first
  time a model is promoted, so every later comparison uses identical images)?
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fsad_pipeline.artifacts import load_sample_set, save_sample_set
from fsad_pipeline.evaluation.metrics import image_auroc
from fsad_pipeline.model_store.bundle import load_bundle
from fsad_pipeline.scoring.ensemble import score_in_chunks
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet

FROZEN_VALIDATION_DIR = "frozen_validation"
RETRAIN_LOCK = ".retrain.lock"


class RetrainBusy(RuntimeError):
    """Another retraining run holds the lock."""


def frozen_validation(store_root: str | Path, candidate: PseudoAnomalySet) -> tuple[PseudoAnomalySet, bool]:
    """The store's frozen validation set; frozen from ``candidate`` when there is none (or its size differs).

    Returns ``(validation set, newly_frozen)``.
    """
    folder = Path(store_root) / FROZEN_VALIDATION_DIR
    if (folder / "samples.csv").is_file():
        frozen = load_sample_set(folder)
        if frozen.images.shape[1:] == candidate.images.shape[1:]:
            return frozen, False
    save_sample_set(folder, candidate)
    return candidate, True


def bundle_validation_auroc(bundle_dir: str | Path, validation: PseudoAnomalySet, *, device: str = "cpu") -> dict:
    """Fused image AUROC (and the mean normal / anomalous score) of a bundle on a validation set."""
    bundle = load_bundle(bundle_dir, device=device)
    ensemble = bundle.ensemble()
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
            raise RetrainBusy(f"another retraining run holds {path} ({holder or 'unreadable lock'})") from None
    else:
        raise RetrainBusy(f"could not take {path}")
    try:
        os.write(handle, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        os.close(handle)
        yield path
    finally:
        path.unlink(missing_ok=True)
