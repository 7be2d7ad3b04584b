"""Error states of the model store and the retrain lock say how to get out of them, and a lock
left by a run that died before writing its pid does not block retraining for ever."""

from __future__ import annotations

import os
import time

import pytest

from fsad_pipeline.model_store.champion_challenger import (
    RETRAIN_LOCK,
    UNREADABLE_LOCK_STALE_SECONDS,
    RetrainBusy,
    retrain_lock,
)
from fsad_pipeline.model_store.store import ModelStore, StoreError


def test_an_empty_lock_older_than_a_minute_is_stale_and_a_fresh_one_is_not(tmp_path):
    lock = tmp_path / RETRAIN_LOCK
    lock.write_text("")
    with pytest.raises(RetrainBusy, match="delete that file"):  # just created: maybe being written
        with retrain_lock(tmp_path):
            pass
    old = time.time() - UNREADABLE_LOCK_STALE_SECONDS - 5
    os.utime(lock, (old, old))
    with retrain_lock(tmp_path) as taken:
        assert taken == lock and '"pid"' in lock.read_text()
    assert not lock.exists()


def test_a_lock_from_another_host_names_the_way_out(tmp_path):
    (tmp_path / RETRAIN_LOCK).write_text('{"pid": 1, "host": "another-container"}')
    with pytest.raises(RetrainBusy, match="another-container.*delete that file"):
        with retrain_lock(tmp_path):
            pass


def test_a_champion_link_to_a_missing_version_says_what_to_do(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.versions_dir.mkdir(parents=True)
    os.symlink("versions/v0007", store.champion_path)
    with pytest.raises(StoreError, match="remove .*champion.*then promote a model or roll back"):
        store.current()


def test_a_promotion_that_expected_another_champion_is_refused_and_changes_nothing(tmp_path, tiny_model_parts):
    """Retraining compared its challenger with v0001; a manual promotion made v0002 meanwhile:
    the challenger must not replace v0002 unseen."""
    from fsad_pipeline.model_store.bundle import export_bundle

    def bundle(name):
        target = tmp_path / name
        export_bundle(target, config_version=1, fusion=tiny_model_parts["fusion"], data_fingerprint="x",
                      **{k: v for k, v in tiny_model_parts.items() if k not in ("image_size", "fusion")})
        return target

    store = ModelStore(tmp_path / "models")
    store.promote(bundle("a"), {"reason": "first"}, expect_champion=None)
    store.promote(bundle("b"), {"reason": "manual"})
    challenger = bundle("c")
    with pytest.raises(StoreError, match="champion is v0002, not v0001"):
        store.promote(challenger, {"reason": "retrain"}, move=True, expect_champion="v0001")
    assert store.current().version == "v0002" and challenger.is_dir()
    assert store.promote(challenger, {"reason": "retrain"}, expect_champion="v0002").version == "v0003"
