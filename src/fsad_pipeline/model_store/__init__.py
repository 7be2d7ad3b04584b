"""The model store: what gets promoted, kept, compared and rolled back.

* :mod:`.bundle`: the checksummed model bundle (everything needed to score new images, in one
  self-describing folder), its export, verification and loading.
* :mod:`.store`: the champion store (every promoted bundle under its version, one champion,
  promotion records and rollback).
* :mod:`.champion_challenger`: champion vs challenger on one frozen validation set, the promotion
  decision, and the lock that serialises retraining.

Nothing is imported here, so ``import fsad_pipeline.model_store.store`` stays as light as the
module itself; the scorers the bundle loads live in :mod:`fsad_pipeline.scoring`.
"""
