"""The champion store: promoted model bundles, each kept under its version, and one champion.

Layout (``root`` is ``models/`` by default)::

    models/
      champion -> versions/v0003    relative symlink: the bundle inference uses
      versions/v0001/ ...           every promoted bundle, never changed after promotion,
      versions/v0002/ ...           plus its promotion.json (version, status, decision record)
      versions/v0003/ ...
      store_log.jsonl               one line per promotion and rollback (audit trail)

Promotion copies (or moves) the candidate into a staging folder, verifies every checksum, renames
it to its version, and only then flips ``champion`` with :func:`os.replace` on a symlink, which
is atomic: at every instant ``champion`` is either the old bundle or the new one. A crash before
the flip leaves the champion untouched; the half-done version is marked ``staged`` and cleaned up
by the next store operation. Rollback is the same flip, back to the newest older version.
Mutations take an exclusive lock file, so two processes never promote at once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fsad_pipeline.artifacts import read_json, write_json
from fsad_pipeline.model_store.bundle import PROMOTION_FILE, verify_bundle

logger = logging.getLogger(__name__)

CHAMPION_LINK = "champion"
VERSIONS_DIR = "versions"
LOG_FILE = "store_log.jsonl"
LOCK_FILE = ".store.lock"
_VERSION = re.compile(r"^v(\d{4,})$")
_STAGING_PREFIX = ".staging-"


class StoreError(RuntimeError):
    """The store cannot do what was asked (busy, nothing to roll back to, damaged layout)."""


@dataclass(frozen=True)
class StoreEntry:
    """One promoted bundle: its version, folder, promotion record and whether it is the champion."""

    version: str
    path: Path
    record: dict
    is_current: bool


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk (best effort) before it is renamed into
    place: after a power loss the champion then points at complete files, not truncated ones."""
    for path in root.rglob("*"):
        _fsync_dir(path)  # fsync through a read-only descriptor: files may be read-only
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    """Make a rename in folder ``path`` (or the content of file ``path``) durable (best effort;
    not every filesystem supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: ``expect_champion``'s default: promote whatever the champion is.
ANY_CHAMPION = object()


class ModelStore:
    """Champion/challenger primitives: :meth:`promote`, :meth:`current`, :meth:`rollback`, :meth:`history`."""

    def __init__(self, root: str | Path, *, lock_timeout: float = 60.0):
        self.root = Path(root)
        self.lock_timeout = float(lock_timeout)

    @property
    def champion_path(self) -> Path:
        """The path inference reads (``<root>/champion``), whether or not a champion exists yet."""
        return self.root / CHAMPION_LINK

    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS_DIR

    # ------------------------------------------------------------------ reading
    def _version_dirs(self) -> list[tuple[int, Path]]:
        if not self.versions_dir.is_dir():
            return []
        found = []
        for path in self.versions_dir.iterdir():
            match = _VERSION.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def _current_version(self) -> str | None:
        link = self.champion_path
        if not link.is_symlink():
            if link.exists():
                raise StoreError(f"{link} is not the store's champion link; move it away and promote again")
            return None
        version = Path(os.readlink(link)).name
        if not (self.versions_dir / version).is_dir():
            raise StoreError(
                f"{link} points to {os.readlink(link)}, which does not exist: remove {link} (the versions are "
                "kept), then promote a model or roll back to a version that is there"
            )
        return version

    def _entry(self, path: Path, current: str | None) -> StoreEntry:
        record_path = path / PROMOTION_FILE
        record = read_json(record_path) if record_path.is_file() else {}
        return StoreEntry(path.name, path, record, path.name == current)

    def current(self) -> StoreEntry | None:
        """The champion, or None before the first promotion."""
        version = self._current_version()
        return None if version is None else self._entry(self.versions_dir / version, version)

    def history(self) -> list[StoreEntry]:
        """Every bundle that was ever champion, oldest first (``is_current`` marks the champion)."""
        current = self._current_version()
        entries = [self._entry(path, current) for _, path in self._version_dirs()]
        return [e for e in entries if e.is_current or e.record.get("status") in ("promoted", "rolled_back")]

    def events(self) -> list[dict]:
        """The audit trail: one dict per promotion and rollback, oldest first."""
        path = self.root / LOG_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # ------------------------------------------------------------------ internals
    @contextmanager
    def _lock(self) -> Iterator[None]:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout
        with open(self.root / LOCK_FILE, "a+") as handle:
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as error:
                    if error.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        raise StoreError(f"the model store {self.root} is busy (another promotion or rollback)") from error
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _log(self, event: Mapping[str, Any]) -> None:
        with open(self.root / LOG_FILE, "a") as handle:
            handle.write(json.dumps(dict(event), sort_keys=True, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _recover(self) -> None:
        """Finish or undo what a crashed promotion left behind (called under the lock)."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.versions_dir.glob(f"{_STAGING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.root.glob(f".{CHAMPION_LINK}.tmp-*"):
            leftover.unlink(missing_ok=True)
        current = self._current_version()
        for _, path in self._version_dirs():
            record_path = path / PROMOTION_FILE
            record = read_json(record_path) if record_path.is_file() else {}
            if record.get("status", "staged") != "staged":
                continue
            if path.name == current:  # crashed after the flip: the promotion did happen
                record["status"] = "promoted"
                write_json(record_path, record)
                self._log({"event": "promote", "version": path.name, "at": _now(), "recovered": True})
            else:  # crashed before the flip: never champion
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _stage(candidate: Path, staging: Path, move: bool) -> bool:
        """Put the candidate at ``staging``: renamed when ``move`` allows (same filesystem), else copied."""
        if move:
            try:
                os.replace(candidate, staging)
                return True
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
        shutil.copytree(candidate, staging, symlinks=False)
        return False

    def _point_champion_to(self, version: str) -> None:
        temporary = self.root / f".{CHAMPION_LINK}.tmp-{os.getpid()}"
        temporary.unlink(missing_ok=True)
        os.symlink(Path(VERSIONS_DIR) / version, temporary, target_is_directory=True)
        os.replace(temporary, self.champion_path)  # atomic: old champion or new, never neither
        _fsync_dir(self.root)

    # ------------------------------------------------------------------ changing
    def promote(
        self,
        candidate_dir: str | Path,
        decision_record: Mapping[str, Any],
        *,
        expect: Mapping[str, Any] | None = None,
        move: bool = False,
        expect_champion: str | None | object = ANY_CHAMPION,
    ) -> StoreEntry:
        """Make the bundle at ``candidate_dir`` the champion; the previous one stays under its version.

        The candidate is verified first (checksums, ``expect``); ``move`` renames it into the store
        instead of copying (for candidates built in a scratch folder on the same filesystem).
        ``decision_record`` (why it was promoted, metrics compared, …) is kept in the version's
        ``promotion.json``. ``expect_champion`` (a version, or None for "no champion yet") is
        checked under the store's lock: a challenger compared with one champion is not promoted
        over another that a manual promotion or a rollback put there meanwhile. Any failure
        leaves the champion as it was.
        """
        candidate = Path(candidate_dir)
        manifest = verify_bundle(candidate, expect)
        with self._lock():
            self._recover()
            previous = self._current_version()
            if expect_champion is not ANY_CHAMPION and previous != expect_champion:
                raise StoreError(
                    f"the champion is {previous or 'none'}, not {expect_champion or 'none'} as this promotion "
                    "expected (promoted or rolled back meanwhile); not promoted: compare again"
                )
            number = max((n for n, _ in self._version_dirs()), default=0) + 1
            version = f"v{number:04d}"
            staging = self.versions_dir / f"{_STAGING_PREFIX}{version}-{os.getpid()}"
            final = self.versions_dir / version
            record = {
                "version": version,
                "status": "staged",
                "promoted_at": _now(),
                "previous": previous,
                "source": str(candidate.resolve()),
                "content_hash": manifest.get("content_hash"),
                "backbone": manifest.get("backbone"),
                "image_size": manifest.get("image_size"),
                "config_version": manifest.get("config_version"),
                "decision": dict(decision_record),
            }
            moved = False
            try:
                moved = self._stage(candidate, staging, move)
                write_json(staging / PROMOTION_FILE, record)
                verify_bundle(staging)  # the copy is complete and intact
                _fsync_tree(staging)
                os.replace(staging, final)
                _fsync_dir(self.versions_dir)
            except BaseException:
                if moved and staging.exists() and not candidate.exists():
                    os.replace(staging, candidate)
                    (candidate / PROMOTION_FILE).unlink(missing_ok=True)
                shutil.rmtree(staging, ignore_errors=True)
                raise
            try:
                self._point_champion_to(version)
            except BaseException:
                if self._current_version() != version:
                    shutil.rmtree(final, ignore_errors=True)
                raise
            record["status"] = "promoted"
            write_json(final / PROMOTION_FILE, record)
            self._log({"event": "promote", "version": version, "previous": previous, "at": record["promoted_at"],
                       "decision": record["decision"]})
            logger.info("model store %s: promoted %s to champion (previous: %s)", self.root, version, previous or "none")
            return StoreEntry(version, final, record, True)

    def rollback(self, decision_record: Mapping[str, Any] | None = None, *, to: str | None = None) -> StoreEntry:
        """Make an earlier bundle the champion again (default: the newest one older than the champion).

        The bundle rolled back from stays in the store (status ``rolled_back``) and can be
        promoted again from its folder.
        """
        with self._lock():
            self._recover()
            current = self._current_version()
            if current is None:
                raise StoreError(f"the model store {self.root} has no champion to roll back from")
            candidates = [e for e in self.history() if not e.is_current]
            if to is not None:
                chosen = next((e for e in candidates if e.version == to), None)
                if chosen is None:
                    raise StoreError(f"no earlier version {to!r} in {self.root} (have {[e.version for e in candidates]})")
            else:
                older = [e for e in candidates if int(e.version[1:]) < int(current[1:])]
                if not older:
                    raise StoreError(f"{current} is the oldest version in {self.root}: nothing to roll back to")
                chosen = older[-1]
            self._point_champion_to(chosen.version)
            now = _now()
            from_record_path = self.versions_dir / current / PROMOTION_FILE
            from_record = read_json(from_record_path) if from_record_path.is_file() else {"version": current}
            write_json(from_record_path, {**from_record, "status": "rolled_back", "rolled_back_at": now})
            to_record = {**chosen.record, "status": "promoted", "restored_at": now}
            write_json(chosen.path / PROMOTION_FILE, to_record)
            self._log({"event": "rollback", "from": current, "to": chosen.version, "at": now,
                       "decision": dict(decision_record or {})})
            return StoreEntry(chosen.version, chosen.path, to_record, True)


def export_and_promote(
    store: ModelStore,
    decision_record: Mapping[str, Any],
    *,
    replace_champion: bool = True,
    expect: Mapping[str, Any] | None = None,
    **export_kwargs: Any,
) -> StoreEntry:
    """Export a bundle (see :func:`export_bundle`) into a scratch folder of the store and promote it.

    With ``replace_champion`` False an existing champion is never replaced (a manual promotion
    must not silently overwrite a model that a comparison put there).
    """
    import tempfile

    from fsad_pipeline.model_store.bundle import export_bundle

    if not replace_champion:
        current = store.current()
        if current is not None:
            raise StoreError(
                f"{store.champion_path} already holds {current.version}; promote with replace_champion=true "
                "to replace it without a comparison (it is kept under its version), or let the retraining "
                "job decide"
            )
    store.root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".candidate-", dir=store.root))
    try:
        export_bundle(scratch / "bundle", **export_kwargs)
        # replace_champion False: checked again under the lock (a champion may have landed meanwhile).
        champion = ANY_CHAMPION if replace_champion else None
        return store.promote(scratch / "bundle", decision_record, expect=expect, move=True, expect_champion=champion)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
