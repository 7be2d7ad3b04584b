"""Tests of the anomalous memory bank scorer and patch selection (tiny dims, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsad_pipeline.models.anomalous_bank import AnomalousBankScorer, select_anomalous_patches


def _banks(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(20, 8, generator=generator)
    anomalous = torch.randn(3, 8, generator=generator) + 5.0
    return anomalous, normal


def test_bank_vectors_score_on_the_right_side() -> None:
    anomalous, normal = _banks()
    scorer = AnomalousBankScorer().fit(anomalous, normal)
    features = torch.stack([anomalous[1], normal[4]]).reshape(1, 1, 2, 8).permute(0, 3, 1, 2)
    scores = scorer.patch_scores(features)
    assert scores.shape == (1, 1, 2)
    assert scores[0, 0, 0] > 0.5
    assert scores[0, 0, 1] < 0.5
    assert ((scores > 0) & (scores < 1)).all()
    assert torch.equal(scorer.image_scores(features), scores[:, 0, 0])


def test_score_is_softmax_of_negative_distances() -> None:
    anomalous, normal = _banks(1)
    query = torch.randn(1, 8, 1, 1) + 2.0
    temperature = 2.5
    scorer = AnomalousBankScorer(temperature=temperature).fit(anomalous, normal)
    flat = query.reshape(1, 8).double()
    d_a = torch.cdist(flat, anomalous.double()).min()
    d_n = torch.cdist(flat, normal.double()).min()
    expected = torch.softmax(torch.stack([-d_a, -d_n]) / temperature, dim=0)[0]
    assert abs(scorer.patch_scores(query).item() - expected.item()) < 1e-4


def test_mask_selection_picks_covered_patches() -> None:
    features = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    masks = torch.zeros(2, 8, 8)
    masks[0, 0, 0] = 1.0  # cell (0, 0), one pixel suffices
    masks[0, 5, 6:8] = 1.0  # cell (2, 3)
    masks[1, 2:4, 2:6] = 1.0  # cells (1, 1) and (1, 2)
    patches = select_anomalous_patches(features, masks)
    expected = torch.stack(
        [features[0, :, 0, 0], features[0, :, 2, 3], features[1, :, 1, 1], features[1, :, 1, 2]]
    )
    assert torch.equal(patches, expected)


def test_fallback_picks_top_patches() -> None:
    features = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    scores = torch.zeros(2, 4, 4)
    scores[0, 3, 1] = 9.0
    scores[0, 0, 2] = 8.0
    scores[0, 1, 1] = 1.0
    masks = torch.zeros(2, 8, 8)
    masks[1, 0:2, 0:2] = 1.0  # image 1 uses its mask, image 0 (all-zero mask) the fallback
    patches = select_anomalous_patches(
        features, masks, fallback_scores=scores, top_fraction=0.1, min_patches=1
    )
    expected = torch.stack([features[0, :, 0, 2], features[0, :, 3, 1], features[1, :, 0, 0]])
    assert torch.equal(patches, expected)  # ceil(0.1 * 16) = 2 per fallback image
    only_one = select_anomalous_patches(
        features[:1], None, fallback_scores=scores[:1], top_fraction=0.01
    )
    assert torch.equal(only_one, features[0, :, 3, 1].unsqueeze(0))


def test_single_anomalous_patch_works() -> None:
    anomalous, normal = _banks(3)
    scorer = AnomalousBankScorer(num_neighbors=3).fit(anomalous[:1], normal)
    features = torch.randn(2, 8, 3, 3)
    features[0, :, 1, 1] = anomalous[0]
    scores = scorer.patch_scores(features)
    assert torch.isfinite(scores).all()
    assert scores[0, 1, 1] > 0.5


def test_error_without_mask_and_fallback() -> None:
    features = torch.randn(1, 3, 2, 2)
    with pytest.raises(ValueError, match="fallback_scores"):
        select_anomalous_patches(features, None)
    with pytest.raises(ValueError, match="mask selects no patch"):
        select_anomalous_patches(features, torch.zeros(1, 4, 4))


def test_save_load_identical(tmp_path: Path) -> None:
    anomalous, normal = _banks(4)
    scorer = AnomalousBankScorer(temperature=0.7, num_neighbors=2, chunk_size=5)
    scorer.fit(anomalous, normal)
    features = torch.randn(2, 8, 3, 4, generator=torch.Generator().manual_seed(5))
    scorer.save(tmp_path)
    assert (tmp_path / "anomalous_bank.safetensors").is_file()
    assert (tmp_path / "anomalous_bank.json").is_file()
    loaded = AnomalousBankScorer.load(tmp_path)
    assert loaded.name == "anomalous_bank"
    assert torch.equal(loaded.patch_scores(features), scorer.patch_scores(features))


def test_log_odds_keep_apart_what_the_probability_saturates(tmp_path: Path) -> None:
    """Far from the normal bank, the probability is exactly 1.0 in float32 for a patch a little
    closer to a defect and for one much closer; the log-odds are their sigmoid's argument, in
    the same order, and stay apart. The choice survives save and load."""
    normal = torch.zeros(4, 2)
    anomalous = torch.tensor([[100.0, 0.0]])
    features = torch.tensor([[[[60.0, 90.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2): two patches
    probability = AnomalousBankScorer().fit(anomalous, normal).patch_scores(features)
    assert probability[0, 0, 0] == probability[0, 0, 1] == 1.0  # tied
    scorer = AnomalousBankScorer(score="log_odds").fit(anomalous, normal)
    log_odds = scorer.patch_scores(features)
    torch.testing.assert_close(log_odds, torch.tensor([[[60.0 - 40.0, 90.0 - 10.0]]]))
    assert torch.equal(torch.sigmoid(log_odds), probability)
    scorer.save(tmp_path)
    assert torch.equal(AnomalousBankScorer.load(tmp_path).patch_scores(features), log_odds)
    with pytest.raises(ValueError, match="score must be one of"):
        AnomalousBankScorer(score="odds")
