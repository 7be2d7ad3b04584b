"""Scheduled retraining: new data → ``dvc repro`` → challenger vs champion → promote or keep.

``fsad-retrain`` (see :func:`fsad_pipeline.console.retrain_main`) runs :func:`retrain` in a project:

1. take the store's retrain lock (a second run exits at once; a crash leaves no live lock);
2. fingerprint the raw data (the manifest's file hashes) and compare it with the champion's:
   unchanged → "nothing to do" (exit 0), unless ``force``;
3. ``dvc repro`` (only the stages whose inputs changed run);
4. bundle the run's artifacts as the challenger, score champion and challenger on the store's
   frozen validation set (:mod:`fsad_pipeline.model_store.champion_challenger`);
5. promote the challenger only if it is not worse (atomic symlink swap in the model store, the
   previous champion kept under its version; ``fsad-retrain --rollback`` undoes it);
6. write a JSON decision record either way (``<store>/decisions/``), also when a step crashed —
   the champion is never touched before step 5's atomic swap.

This module is application glue (it reads Kedro config and catalog and calls DVC); the decisions
themselves live in the core.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fsad_pipeline.artifacts import write_json

logger = logging.getLogger(__name__)

DECISIONS_DIR = "decisions"
OUTCOME_EXIT = {"nothing_to_do": 0, "promoted": 0, "rejected": 0, "failed": 1}


def _parameters(project: Path) -> dict[str, Any]:
    from kedro.config import OmegaConfigLoader

    conf = project / "conf"
    local = conf / "local"
    loader = OmegaConfigLoader(conf_source=str(conf), base_env="base", default_run_env="local" if local.is_dir() else "base")
    return dict(loader["parameters"])


def current_data_fingerprint(project: Path, data: dict) -> str:
    """The fingerprint of the raw data as the ingestion stage would see it now."""
    from fsad_pipeline.data.manifest import manifest_fingerprint, manifest_from_parameters

    cwd = Path.cwd()
    os.chdir(project)  # data.root is relative to the project
    try:
        manifest, _ = manifest_from_parameters(data)
    finally:
        os.chdir(cwd)
    return manifest_fingerprint(manifest)


def _run_dvc_repro(project: Path, command: list[str]) -> float:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # dvc + the stages' kedro
    started = time.perf_counter()
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
        raise RuntimeError(f"`{' '.join(command)}` failed with exit status {result.returncode}:\n{tail}")
    return time.perf_counter() - started


def _export_challenger(project: Path, params: dict, target: Path, fingerprint: str) -> None:
    """Bundle the run's file-backed artifacts (read through the Kedro catalog) into ``target``."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from fsad_pipeline.classification.defect_types import bundle_component
    from fsad_pipeline.model_store.bundle import export_bundle

    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        catalog = session.load_context().catalog
        export_bundle(
            target,
            dfd_model=catalog.load("dfd_model"),
            patch_scorers=catalog.load("patch_scorers"),
            classifier=bundle_component(catalog.load("defect_classifier")),
            fusion=catalog.load("fusion"),
            support_images=catalog.load("support_images"),
            config_version=int(params["config_version"]),
            winclip=params.get("winclip"),
            metrics=catalog.load("metrics"),
            data_fingerprint=fingerprint,
        )


def _load_candidate_validation(project: Path):
    from fsad_pipeline.artifacts import load_sample_set

    return load_sample_set(project / "data" / "05_model_input" / "fusion_validation")


def parse_tolerance(text: str | float) -> float:
    """``--tolerance``: a finite number in [-1, 1] (an AUROC difference); refuses NaN and infinities.

    ``nan`` was accepted and then rejected every challenger ("worse than the champion"), since
    every comparison with NaN is false. Usable as an argparse ``type``.
    """
    import argparse

    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"tolerance must be a number, got {text!r}") from None
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"tolerance must be a finite AUROC difference in [-1, 1], got {text!r}"
        )
    return value


def _earlier_rejection(store_root: Path, fingerprint: str, champion: str | None, tolerance: float) -> dict | None:
    """The newest decision record that already compared a challenger on this raw data against this
    champion, at this or a looser ``tolerance``, and rejected it (so the next scheduled run need
    not repeat it), or None."""
    folder = store_root / DECISIONS_DIR
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.json"), reverse=True):  # names start with a UTC time stamp
        try:
            earlier = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if earlier.get("outcome") == "promoted":
            return None  # a later promotion changed the champion: compare anew
        if (earlier.get("outcome") == "rejected" and earlier.get("data_fingerprint") == fingerprint
                and earlier.get("champion") == champion and float(earlier.get("tolerance", 0.0)) >= tolerance):
            return {**earlier, "record_path": str(path)}
    return None


def _record_path(store_root: Path, outcome: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return store_root / DECISIONS_DIR / f"{stamp}-{outcome}.json"


def retrain(
    project: str | Path,
    *,
    force: bool = False,
    tolerance: float = 0.0,
    device: str = "cpu",
    repro_command: list[str] | None = None,
) -> dict:
    """One retraining attempt; returns the decision record (also written unless nothing was to do).

    Nothing is to do when the raw data is the champion's, or when a challenger on this very data
    was already compared with this champion and rejected (``force`` retrains anyway). The
    comparison set is the one frozen at the first promotion; without one (no champion yet, or a
    champion promoted before sets were frozen) both are compared on the challenger's set, which
    is frozen only once the challenger has been promoted.
    """
    from fsad_pipeline.model_store.bundle import read_manifest
    from fsad_pipeline.model_store.champion_challenger import (
        bundle_validation_auroc,
        decide,
        freeze_validation,
        frozen_validation_record,
        load_frozen_validation,
        retrain_lock,
    )
    from fsad_pipeline.model_store.store import ModelStore

    import argparse

    try:
        tolerance = parse_tolerance(tolerance)
    except argparse.ArgumentTypeError as error:
        raise ValueError(str(error)) from None

    project = Path(project).resolve()
    params = _parameters(project)
    store_root = project / params["model_store"]["root"]
    store = ModelStore(store_root)
    record: dict[str, Any] = {"started_at": datetime.now(timezone.utc).isoformat(), "project": str(project),
                              "force": force, "tolerance": tolerance, "seconds": {}}
    with retrain_lock(store_root):
        started = time.perf_counter()
        try:
            champion = store.current()
            record["champion"] = None if champion is None else champion.version
            fingerprint = current_data_fingerprint(project, params["data"])
            record["data_fingerprint"] = fingerprint
            record["seconds"]["fingerprint"] = round(time.perf_counter() - started, 2)
            if champion is not None and not force:
                if read_manifest(champion.path).get("data_fingerprint") == fingerprint:
                    return {**record, "outcome": "nothing_to_do", "reason": "raw data unchanged since the champion"}
                earlier = _earlier_rejection(store_root, fingerprint, champion.version, tolerance)
                if earlier is not None:
                    return {**record, "outcome": "nothing_to_do",
                            "reason": f"a challenger on this raw data was already rejected against {champion.version} "
                                      f"({earlier['record_path']}); --force compares again"}
            record["seconds"]["dvc_repro"] = round(_run_dvc_repro(project, repro_command or ["dvc", "repro"]), 1)
            scratch = Path(tempfile.mkdtemp(prefix=".challenger-", dir=store_root))
            try:
                step = time.perf_counter()
                _export_challenger(project, params, scratch / "bundle", fingerprint)
                validation = load_frozen_validation(store_root)
                newly_frozen = validation is None
                if newly_frozen:
                    # No champion yet: the challenger becomes the first champion, and its set is
                    # frozen once that promotion has succeeded (the first promotion's set). A
                    # champion promoted before sets were frozen has no run set left: both are
                    # compared on the challenger's, frozen only if the challenger is promoted.
                    validation = _load_candidate_validation(project)
                    if champion is not None:
                        logger.warning("no frozen validation set in %s: comparing on the challenger's", store_root)
                record["validation"] = {"images": len(validation), "anomalous": int(validation.labels.sum()),
                                        "newly_frozen": newly_frozen, **frozen_validation_record(store_root)}
                record["challenger_metrics"] = bundle_validation_auroc(scratch / "bundle", validation, device=device)
                record["champion_metrics"] = (
                    None if champion is None else bundle_validation_auroc(champion.path, validation, device=device)
                )
                record["seconds"]["compare"] = round(time.perf_counter() - step, 1)
                decision = decide(record["challenger_metrics"], record["champion_metrics"], tolerance=tolerance)
                record.update(outcome="promoted" if decision.promote else "rejected", reason=decision.reason)
                if decision.promote:
                    entry = store.promote(scratch / "bundle", {"kind": "retrain", **_summary(record)}, move=True,
                                          expect_champion=record["champion"])  # the one compared against
                    record["promoted_version"] = entry.version
                    if newly_frozen:
                        freeze_validation(store_root, validation, source=f"the run promoted as {entry.version} by retraining")
                        record["validation"].update(frozen_validation_record(store_root))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        except Exception as error:  # the record says what broke; the champion was not touched
            record.update(outcome="failed", reason=f"{type(error).__name__}: {error}",
                          traceback=traceback.format_exc(limit=8))
        record["seconds"]["total"] = round(time.perf_counter() - started, 1)
        record["finished_at"] = datetime.now(timezone.utc).isoformat()
        path = _record_path(store_root, record["outcome"])
        write_json(path, record)
        record["record_path"] = str(path)
        return record


def _summary(record: dict) -> dict:
    keys = ("reason", "data_fingerprint", "champion", "challenger_metrics", "champion_metrics", "validation")
    return {k: record.get(k) for k in keys}


def rollback(project: str | Path, *, to: str | None = None) -> dict:
    """Make the previous (or the named) version the champion again."""
    from fsad_pipeline.model_store.store import ModelStore

    project = Path(project).resolve()
    params = _parameters(project)
    entry = ModelStore(project / params["model_store"]["root"]).rollback({"kind": "manual rollback"}, to=to)
    return {"outcome": "rolled_back", "champion": entry.version, "path": str(entry.path)}
