"""The model bundle: everything needed to score new images, in one self-describing folder.

A bundle is what gets promoted, rolled back and shipped to the line::

    <bundle>/
      bundle.json            manifest: format and config version, backbone, image size, feature
                             configs, scorers, threshold, metrics snapshot, data fingerprint,
                             and the size + SHA-256 of every file below
      dfd/                   the DFD scorer (safetensors + JSON, see scoring/dfd_scorer.py)
      patch_scorers/         the patch-feature scorers (see scoring/patch_scorers.py), when fused
      fusion.json            per-scorer normalisation, fusion weights, calibrated threshold
      support_images.npy     the k support images (WinCLIP's few-shot references)
      classifier/            optional: the defect-type classifier

:func:`load_bundle` refuses, with :class:`BundleError`, a missing or incomplete bundle, a file
whose checksum changed, a manifest whose ``content_hash`` does not match its files table, a
file the table does not list, and (:class:`BundleMismatchError`) a bundle made for another backbone,
image size or config version than the caller expects. Only safe formats are read.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fsad_pipeline.artifacts import atomic_directory, load_array, read_json, save_array
from fsad_pipeline.data.geometry import as_hw, image_size_matches
from fsad_pipeline.scoring.dfd_scorer import DFDScorer
from fsad_pipeline.scoring.ensemble import ScorerEnsemble, assemble, build_winclip
from fsad_pipeline.scoring.fusion import Fusion
from fsad_pipeline.scoring.patch_scorers import PatchScorerSet

#: Bumped whenever the bundle layout changes; loading refuses other versions.
BUNDLE_FORMAT_VERSION = 1
MANIFEST_FILE = "bundle.json"
DFD_DIR = "dfd"
PATCH_SCORERS_DIR = "patch_scorers"
FUSION_FILE = "fusion.json"
SUPPORT_FILE = "support_images.npy"
CLASSIFIER_DIR = "classifier"
#: Registered encoders (base training) a bundle's features use, copied in: ``encoders/<name>``.
ENCODERS_DIR = "encoders"
#: Written by the model store into each version's folder after export: the one file besides the
#: manifest that a bundle may hold without a row in its files table.
PROMOTION_FILE = "promotion.json"
_UNLISTED_ALLOWED = frozenset({MANIFEST_FILE, PROMOTION_FILE})

#: What a caller may expect of a bundle (the running project's configuration).
EXPECTATION_KEYS = ("backbone", "image_size", "config_version")

#: The defect-type classifier plugs in here: ``load_defect_classifier(directory)`` in this module
#: must return an object satisfying :class:`DefectTypePredictor`.
#: A code constant, never written into bundle.json (the manifest names the ``classifier`` folder only),
#: so saved bundles load whichever module path this names: moving the module needs no old-path mapping.
CLASSIFIER_MODULE = "fsad_pipeline.classification.defect_types"
CLASSIFIER_LOADER = "load_defect_classifier"
CLASSIFIER_COLUMNS = ("pred_defect_type", "pred_defect_probability", "runner_up_defect_type")


class BundleError(RuntimeError):
    """A model bundle that cannot be used (missing, incomplete, corrupt or unreadable)."""


class BundleMismatchError(BundleError):
    """A bundle made for another backbone, image size or config version than expected."""


class DefectTypePredictor(Protocol):
    """The optional defect-type classifier as the inference path uses it.

    ``predict`` gets the images flagged NG (uint8 (n, H, W, 3), at the bundle's image size) and
    their fused anomaly maps ((n, H, W)); it returns ``pred_defect_type`` (n,) str,
    ``pred_defect_probability`` (n,) float and ``runner_up_defect_type`` (n,) str.
    """

    def predict(self, images: np.ndarray, anomaly_maps: np.ndarray) -> Mapping[str, np.ndarray]: ...

    def save(self, directory: str | Path) -> None: ...


# --------------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------------
def _sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_table(root: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file under ``root`` except the manifest (POSIX relative paths)."""
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative != MANIFEST_FILE:
            table[relative] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return table


def _content_hash(files: Mapping[str, Mapping[str, Any]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]['sha256']}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def export_bundle(
    target: str | Path,
    *,
    dfd_model: DFDScorer,
    fusion: Mapping[str, Any],
    support_images: np.ndarray,
    config_version: int,
    patch_scorers: PatchScorerSet | None = None,
    winclip: Mapping[str, Any] | None = None,
    classifier: DefectTypePredictor | None = None,
    metrics: Mapping[str, Any] | None = None,
    data_fingerprint: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Write a bundle from the pipeline's artifacts (atomically: all of it or nothing).

    ``fusion`` is the scoring stage's ``fusion.json`` content; every scorer it fuses must be
    given (``patch_scorers`` for knn/gaussian/anomalous_bank, ``winclip`` settings with a local
    checkpoint for winclip). Returns the manifest.
    """
    scorers = list(fusion["scorers"])
    patch_names = set(patch_scorers.scorers) if patch_scorers is not None else set()
    for name in scorers:
        if name == "dfd" or name in patch_names:
            continue
        if name == "winclip":
            if not winclip or not winclip.get("checkpoint_path"):
                raise BundleError("the fusion uses winclip but no winclip settings with a checkpoint_path were given")
            continue
        raise BundleError(f"the fusion uses scorer {name!r} but no fitted {name!r} scorer was given")
    image_size = list(as_hw(dfd_model.features.image_size))  # [H, W]: the working size
    if patch_scorers is not None and list(as_hw(patch_scorers.features.image_size)) != image_size:
        raise BundleError(
            f"DFD was trained at image size {image_size} but the patch scorers at {patch_scorers.features.image_size}"
        )
    if patch_scorers is not None:  # only what the fusion reads: no dead weight, no wasted compute
        kept = {name: scorer for name, scorer in patch_scorers.scorers.items() if name in scorers}
        patch_scorers = PatchScorerSet(patch_scorers.features, kept, patch_scorers.info) if kept else None
    support = np.asarray(support_images)
    feature_configs = [
        config for config in (dfd_model.features, getattr(patch_scorers, "features", None), getattr(classifier, "features", None))
        if config is not None
    ]
    with atomic_directory(target) as staging:
        encoders = _copy_registered_encoders(feature_configs, staging)
        dfd_model.save(staging / DFD_DIR)
        if patch_scorers is not None:
            patch_scorers.save(staging / PATCH_SCORERS_DIR)
        # Key order kept (no sort_keys): the fusion sums scorers in the order of its weights.
        (staging / FUSION_FILE).write_text(json.dumps(dict(fusion), indent=2, default=float))
        save_array(staging / SUPPORT_FILE, support)
        if classifier is not None:
            classifier.save(staging / CLASSIFIER_DIR)
        files = _file_table(staging)
        manifest = {
            "format_version": BUNDLE_FORMAT_VERSION,
            "config_version": int(config_version),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backbone": dfd_model.features.backbone,
            "image_size": image_size,
            "features": {
                "dfd": asdict(dfd_model.features),
                "patch_scorers": asdict(patch_scorers.features) if patch_scorers is not None else None,
            },
            "scorers": scorers,
            "threshold": dict(fusion["threshold"]),
            "winclip": dict(winclip) if "winclip" in scorers and winclip else None,
            "components": {
                "dfd": DFD_DIR,
                "patch_scorers": PATCH_SCORERS_DIR if patch_scorers is not None else None,
                "fusion": FUSION_FILE,
                "support_images": SUPPORT_FILE,
                "classifier": CLASSIFIER_DIR if classifier is not None else None,
            },
            "encoders": encoders,
            "k_shot": int(len(support)),
            "metrics": dict(metrics or {}),
            "data_fingerprint": data_fingerprint,
            "content_hash": _content_hash(files),
            "files": files,
            "extra": dict(extra or {}),
        }
        # default=float: metrics may hold numpy scalars.
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=float))
    return manifest


def _one_version(directory: str | Path) -> Path:
    """The folder ``directory`` resolves to now (as given when there is nothing there, so that the
    error names the path the user typed). Resolved once: through ``models/champion`` every later
    open could land in another version (a promotion flips the link), mixing one version's
    manifest with another's weights."""
    given = Path(directory)
    return given.resolve() if given.exists() else given


def _copy_registered_encoders(configs: list, staging: Path) -> dict[str, str]:
    """Copy every registered encoder (``registered:<name>``) the feature configs use into the
    bundle, so that the bundle scores alone: from any working directory, and unchanged by a later
    base-training run that registers a new encoder under the same name. Returns
    ``{backbone reference: folder in the bundle}``."""
    import shutil

    from fsad_pipeline.models.registration import REGISTERED_PREFIX, resolve_encoder_dir

    copied: dict[str, str] = {}
    for reference in dict.fromkeys(config.backbone for config in configs):
        if not reference.startswith(REGISTERED_PREFIX):
            continue
        relative = f"{ENCODERS_DIR}/{len(copied)}"
        shutil.copytree(resolve_encoder_dir(reference), staging / relative)
        copied[reference] = relative
    return copied


def _with_bundled_encoder(features, directory: Path, encoders: Mapping[str, str]):
    """``features`` reading its registered encoder from the bundle's own copy; refused when the
    features use a registered encoder the bundle does not hold (exported before they were copied in)."""
    from dataclasses import replace

    from fsad_pipeline.models.registration import REGISTERED_PREFIX

    if not features.backbone.startswith(REGISTERED_PREFIX):
        return features
    relative = encoders.get(features.backbone)
    if relative is None:
        raise BundleError(f"{directory}: the features use {features.backbone} but the bundle does not contain it; "
                          "export the model again with this code (it copies registered encoders in)")
    return replace(features, backbone=f"{REGISTERED_PREFIX}{(directory / relative).resolve()}")


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def read_manifest(directory: str | Path) -> dict:
    """The bundle's manifest, or :class:`BundleError` saying what is missing."""
    directory = Path(directory)
    if not directory.exists():
        raise BundleError(f"no model at {directory}: promote one first (kedro run --pipelines=promotion)")
    if not directory.is_dir():
        raise BundleError(f"{directory} is not a model bundle directory")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{directory} is not a model bundle: {MANIFEST_FILE} is missing")
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as error:
        raise BundleError(f"{path} cannot be read: {error}") from error
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} is not a bundle manifest")
    return manifest


def check_expectation(manifest: Mapping[str, Any], expect: Mapping[str, Any] | None, where: str = "model") -> None:
    """Raise :class:`BundleMismatchError` listing every expected key the manifest contradicts."""
    unknown = set(expect or {}) - set(EXPECTATION_KEYS)
    if unknown:
        raise ValueError(f"unknown expectation(s) {sorted(unknown)}; allowed: {list(EXPECTATION_KEYS)}")
    problems = []
    for key, wanted in (expect or {}).items():
        if wanted is None:
            continue
        found = manifest.get(key)
        if key == "backbone":
            same = str(found) == str(wanted)
        elif key == "image_size":
            same = found is not None and image_size_matches(found, wanted)
        else:
            same = found is not None and int(found) == int(wanted)
        if not same:
            problems.append(f"{key}: the {where} has {found!r}, this configuration expects {wanted!r}")
    if problems:
        raise BundleMismatchError(
            f"{where} does not match the configuration ({'; '.join(problems)}); "
            "retrain and promote a model for this configuration, or point to a matching one"
        )


def verify_bundle(directory: str | Path, expect: Mapping[str, Any] | None = None, *, check_files: bool = True) -> dict:
    """Validate a bundle without loading its models; returns the manifest.

    Checks the format version, ``expect`` (backbone, image size, config version), that the
    required components are there, and (``check_files``) the size and SHA-256 of every file.
    """
    directory = _one_version(directory)
    manifest = read_manifest(directory)
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleMismatchError(
            f"{directory}: bundle format version {version!r}, this code reads version {BUNDLE_FORMAT_VERSION}; "
            "export the model again with this code"
        )
    check_expectation(manifest, expect, where=f"model at {directory}")
    components = manifest.get("components") or {}
    for relative in [*components.values(), *(manifest.get("encoders") or {}).values()]:
        if relative is not None and (not isinstance(relative, str) or not _inside(relative)):
            raise BundleError(f"{directory}: the manifest names {relative!r}, outside the bundle")
    for name in ("dfd", "fusion", "support_images"):
        if not components.get(name) or not (directory / components[name]).exists():
            raise BundleError(f"{directory}: the {name} component is missing")
    for name in ("patch_scorers", "classifier"):
        if components.get(name) and not (directory / components[name]).exists():
            raise BundleError(f"{directory}: the {name} component is missing")
    files = _checked_file_table(directory, manifest)
    if check_files:
        _check_files_on_disk(directory, files)
    return manifest


def _checked_file_table(directory: Path, manifest: Mapping[str, Any]) -> dict[str, dict]:
    """The manifest's files table, refused unless well formed and matching its ``content_hash``."""
    files = manifest.get("files") or {}
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{directory}: the manifest lists no files")
    for relative, expected in files.items():
        if not isinstance(expected, dict) or not isinstance(expected.get("sha256"), str) \
                or not isinstance(expected.get("bytes"), int):
            raise BundleError(f"{directory}: the files table entry for {relative} is malformed")
        if not _inside(relative):
            raise BundleError(f"{directory}: the files table names {relative!r}, outside the bundle")
    recorded = manifest.get("content_hash")
    if recorded != _content_hash(files):
        raise BundleError(
            f"{directory}: {MANIFEST_FILE}'s content_hash {recorded!r} does not match its files table "
            "(the manifest was edited after export); export the model again"
        )
    return files


def _inside(relative: str) -> bool:
    """A relative path that stays inside the bundle (no absolute path, no ``..``)."""
    path = Path(relative)
    return bool(relative) and not path.is_absolute() and ".." not in path.parts


def _check_files_on_disk(directory: Path, files: Mapping[str, Mapping[str, Any]]) -> None:
    """Every listed file exists with its recorded size and SHA-256, and no other file is there."""
    for relative, expected in files.items():
        path = directory / relative
        if not path.is_file():
            raise BundleError(f"{directory}: file {relative} is missing")
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise BundleError(f"{directory}: file {relative} has changed since export (checksum mismatch)")
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative not in files and relative not in _UNLISTED_ALLOWED:
            raise BundleError(
                f"{directory}: file {relative} is not in {MANIFEST_FILE}'s files table (added after export); "
                "remove it or export the model again"
            )


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def _default_classifier_loader(directory: Path) -> DefectTypePredictor:
    try:
        module = importlib.import_module(CLASSIFIER_MODULE)
    except ImportError as error:
        raise BundleError(
            f"the bundle has a defect-type classifier but this code has none ({CLASSIFIER_MODULE}: {error})"
        ) from error
    loader = getattr(module, CLASSIFIER_LOADER, None)
    if loader is None:
        raise BundleError(f"{CLASSIFIER_MODULE} has no {CLASSIFIER_LOADER}(directory)")
    return loader(directory)


@dataclass
class ModelBundle:
    """A loaded bundle: the fitted scorers, the fusion and threshold, optional classifier."""

    root: Path
    manifest: dict
    dfd: DFDScorer
    patch_scorers: PatchScorerSet | None
    fusion: Fusion
    threshold: dict
    support_images: np.ndarray
    classifier: DefectTypePredictor | None = None
    device: str = "cpu"

    @property
    def backbone(self) -> str:
        return str(self.manifest["backbone"])

    @property
    def image_size(self) -> tuple[int, int]:
        """The working size (H, W) the models were fitted at; an old bundle's int is a square."""
        return as_hw(self.manifest["image_size"])

    @property
    def scorers(self) -> list[str]:
        return list(self.manifest["scorers"])

    @property
    def promotion(self) -> dict | None:
        """The model store's promotion record, when the bundle was loaded from the store."""
        path = self.root / PROMOTION_FILE
        return read_json(path) if path.is_file() else None

    def ensemble(self) -> ScorerEnsemble:
        """The scorer ensemble with the bundle's fusion, as the scoring stage built it."""
        winclip = None
        if "winclip" in self.scorers:
            winclip = build_winclip(self.support_images, self.manifest.get("winclip") or {}, device=self.device)
            if winclip is None:
                raise BundleError(
                    f"{self.root}: the model fuses WinCLIP but its CLIP checkpoint "
                    f"({(self.manifest.get('winclip') or {}).get('checkpoint_path')}) cannot be loaded"
                )
        self.dfd.extractor  # build the backbone now, not inside the first timed batch
        return assemble(
            self.dfd,
            self.patch_scorers,
            image_size=self.image_size,
            winclip_scorer=winclip,
            device=self.device,
            fusion=self.fusion,
        )


def load_bundle(
    directory: str | Path,
    expect: Mapping[str, Any] | None = None,
    *,
    device: str = "auto",
    check_files: bool = True,
    classifier_loader: Callable[[Path], DefectTypePredictor] | None = None,
) -> ModelBundle:
    """Validate (see :func:`verify_bundle`) and load a bundle; refuses with :class:`BundleError`."""
    from fsad_pipeline.models.features import select_device

    directory = _one_version(directory)
    manifest = verify_bundle(directory, expect, check_files=check_files)
    components = manifest["components"]
    torch_device = str(select_device(device))
    try:
        dfd = DFDScorer.load(directory / components["dfd"], device=torch_device)
        patch = PatchScorerSet.load(directory / components["patch_scorers"]) if components.get("patch_scorers") else None
        fusion_record = read_json(directory / components["fusion"])
        fusion = Fusion.from_dict(fusion_record)
        support = load_array(directory / components["support_images"])
    except (OSError, ValueError, KeyError) as error:
        raise BundleError(f"{directory}: cannot load the model ({type(error).__name__}: {error})") from error
    if dfd.features.backbone != manifest["backbone"] or as_hw(dfd.features.image_size) != as_hw(manifest["image_size"]):
        raise BundleError(f"{directory}: dfd/ was saved for {dfd.features.backbone} at {dfd.features.image_size}, "
                          f"the manifest says {manifest['backbone']} at {manifest['image_size']}")
    encoders = manifest.get("encoders") or {}
    dfd.features = _with_bundled_encoder(dfd.features, directory, encoders)  # before the extractor is built
    if patch is not None:
        patch.features = _with_bundled_encoder(patch.features, directory, encoders)
    if patch is not None and as_hw(patch.features.image_size) != as_hw(manifest["image_size"]):
        raise BundleError(f"{directory}: patch_scorers/ was saved at image size {patch.features.image_size}")
    available = {"dfd", "winclip", *(patch.scorers if patch is not None else ())}
    missing = [name for name in fusion.scorers if name not in available]
    if missing:
        raise BundleError(f"{directory}: the fusion uses {missing} but the bundle does not contain them")
    classifier = None
    if components.get("classifier"):
        classifier = (classifier_loader or _default_classifier_loader)(directory / components["classifier"])
        if hasattr(classifier, "features"):
            classifier.features = _with_bundled_encoder(classifier.features, directory, encoders)
    return ModelBundle(
        root=directory,
        manifest=manifest,
        dfd=dfd,
        patch_scorers=patch,
        fusion=fusion,
        threshold=dict(fusion_record["threshold"]),
        support_images=support,
        classifier=classifier,
        device=torch_device,
    )
