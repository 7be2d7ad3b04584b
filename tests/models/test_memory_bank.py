"""Tests for the kNN index and the PatchCore-style memory-bank scorer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fsad_pipeline.models.memory_bank import (
    MemoryBankScorer,
    NearestNeighbourIndex,
    faiss_available,
    faiss_gpu_available,
)

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
BACKENDS = ["torch", pytest.param("faiss", marks=needs_faiss)]

HAND_BANK = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], dtype=np.float32)


def _random(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _as_features(patches: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(N·h·w, D) patches → (N, D, h, w) features (row-major over the grid)."""
    dim = patches.shape[1]
    return torch.from_numpy(patches).reshape(-1, height, width, dim).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_nearest_neighbours(backend: str) -> None:
    index = NearestNeighbourIndex(backend=backend).build(HAND_BANK)
    queries = np.array([[0.1, 0.0], [1.0, 0.5], [3.0, 4.0]], dtype=np.float32)
    distances, indices = index.search(queries, k=2)
    assert indices[:, 0].tolist() == [0, 1, 3]
    assert indices[:, 1].tolist() == [1, 0, 2]
    expected = [[0.1, 0.9], [0.5, math.sqrt(1.25)], [1.0, math.sqrt(9 + 4)]]
    torch.testing.assert_close(distances, torch.tensor(expected), atol=1e-6, rtol=0)
    assert index.kind == ("torch" if backend == "torch" else "faiss_flat")


@needs_faiss
def test_faiss_and_torch_agree() -> None:
    bank, queries = _random((300, 16), 0), _random((50, 16), 1)
    for exact in (True, False):
        faiss_result = NearestNeighbourIndex(backend="faiss", exact_distances=exact).build(bank)
        torch_result = NearestNeighbourIndex(
            backend="torch", exact_distances=exact, max_chunk_elements=3000
        ).build(bank)  # tiny chunks: several query blocks
        d_faiss, i_faiss = faiss_result.search(queries, k=5)
        d_torch, i_torch = torch_result.search(queries, k=5)
        torch.testing.assert_close(d_faiss, d_torch, atol=1e-4, rtol=0)
        assert torch.equal(i_faiss, i_torch)


@needs_faiss
def test_ivf_above_threshold_is_exact_with_full_probe() -> None:
    bank, queries = _random((400, 8), 2), _random((40, 8), 3)
    ivf = NearestNeighbourIndex(backend="auto", ivf_threshold=100, nlist=8, nprobe=8).build(bank)
    assert ivf.kind == "faiss_ivf"
    reference = NearestNeighbourIndex(backend="torch").build(bank)
    d_ivf, i_ivf = ivf.search(queries, k=3)
    d_ref, i_ref = reference.search(queries, k=3)
    assert torch.equal(i_ivf, i_ref)
    torch.testing.assert_close(d_ivf, d_ref, atol=1e-5, rtol=0)
    default = NearestNeighbourIndex(ivf_threshold=100).build(bank)
    assert default.kind == "faiss_ivf" and default._index.nlist == round(4 * math.sqrt(400))
    # auto below the IVF threshold: the exact torch search on a CPU (faster than faiss-cpu's flat index)
    expected_flat = "faiss_gpu_flat" if faiss_gpu_available() else "torch"
    assert NearestNeighbourIndex(ivf_threshold=1000).build(bank).kind == expected_flat
    assert NearestNeighbourIndex(backend="faiss", ivf_threshold=1000, use_gpu=False).build(bank).kind == "faiss_flat"


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_save_load(tmp_path, backend: str) -> None:
    bank, queries = _random((60, 6), 4), _random((10, 6), 5)
    index = NearestNeighbourIndex(backend=backend).build(bank)
    path = tmp_path / ("bank.npy" if backend == "torch" else "index.faiss")
    index.save(path)
    loaded = NearestNeighbourIndex.load(path)
    np.testing.assert_array_equal(loaded.bank, bank)
    for left, right in zip(index.search(queries, 4), loaded.search(queries, 4), strict=True):
        assert torch.equal(left, right)


@pytest.mark.parametrize("backend", BACKENDS)
def test_features_equal_to_bank_entries_score_zero(backend: str) -> None:
    support = torch.from_numpy(_random((3, 8, 4, 4), 6))
    scorer = MemoryBankScorer(coreset_ratio=None, backend=backend, progress=False).fit(support)
    assert scorer.bank.shape == (3 * 16, 8)
    scores = scorer.patch_scores(support)
    assert scores.shape == (3, 4, 4)
    assert torch.equal(scores, torch.zeros_like(scores))
    shifted = scorer.patch_scores(support + 10.0)
    assert (shifted > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reweighting_matches_hand_computation(backend: str) -> None:
    support = _as_features(HAND_BANK, 2, 2)  # one support image, 2×2 grid = the 4 bank vectors
    scorer = MemoryBankScorer(coreset_ratio=None, num_neighbors=3, backend=backend, progress=False)
    scorer.fit(support)
    test = _as_features(np.array([[0.1, 0.0], [1.0, 0.5]], dtype=np.float32), 1, 2)
    patch_scores = scorer.patch_scores(test)
    torch.testing.assert_close(patch_scores, torch.tensor([[[0.1, 0.5]]]), atol=1e-6, rtol=0)
    # s* = 0.5 at m_test* = (1, 0.5); m* = (1, 0); its 3 nearest bank vectors: (1,0), (0,0), (0,2).
    distances = [0.5, math.sqrt(1.25), math.sqrt(3.25)]
    weight = 1.0 - math.exp(distances[0]) / sum(math.exp(value) for value in distances)
    expected = torch.tensor([weight * 0.5])
    torch.testing.assert_close(scorer.image_scores(test), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(scorer.image_scores(test, patch_scores), expected, atol=1e-6, rtol=0)
    scorer.num_neighbors = 1
    torch.testing.assert_close(scorer.image_scores(test), torch.tensor([0.5]), atol=1e-6, rtol=0)


def test_coreset_ratio_sets_bank_size() -> None:
    support = torch.from_numpy(_random((2, 8, 5, 5), 7))
    scorer = MemoryBankScorer(coreset_ratio=0.2, backend="torch", progress=False).fit(support)
    assert scorer.bank.shape == (10, 8)
    assert scorer.grid_size == (5, 5) and scorer.num_support_patches == 50
    result = scorer.score_features(torch.from_numpy(_random((3, 8, 5, 5), 8)))
    assert result["patch_scores"].shape == (3, 5, 5) and result["image_scores"].shape == (3,)
    with pytest.raises(ValueError):
        scorer.patch_scores(torch.zeros(1, 7, 5, 5))


def test_leave_out_images_equals_a_refit_without_them() -> None:
    support = torch.from_numpy(_random((4, 8, 5, 5), 11))
    queries = torch.from_numpy(_random((3, 8, 5, 5), 12))
    full = MemoryBankScorer(coreset_ratio=None, num_neighbors=3, backend="torch", progress=False).fit(support)
    fold = full.leave_out_images(1, 3)
    refit = MemoryBankScorer(coreset_ratio=None, num_neighbors=3, backend="torch", progress=False).fit(support[[0, 3]])
    np.testing.assert_array_equal(fold.bank, refit.bank)  # without a coreset: exactly the refit
    torch.testing.assert_close(fold.image_scores(queries), refit.image_scores(queries))
    assert fold.num_support_patches == 50 and fold.source_rows.tolist() == list(range(50))
    assert fold.leave_out_images(0, 1).bank.shape == (25, 8)  # renumbered rows: image 3 is now image 1


def test_leave_out_images_drops_exactly_the_coreset_vectors_of_those_images() -> None:
    support = torch.from_numpy(_random((4, 8, 5, 5), 13))
    full = MemoryBankScorer(coreset_ratio=0.3, backend="torch", progress=False).fit(support)
    from_image = full.source_rows // 25
    fold = full.leave_out_images(2, 3)
    np.testing.assert_array_equal(fold.bank, full.bank[from_image != 2])
    patches = support.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    np.testing.assert_array_equal(full.bank, patches[full.source_rows])  # rows name their patch
    with pytest.raises(ValueError, match="empty bank"):
        full.leave_out_images(0, 4)


@pytest.mark.parametrize(
    ("backend", "ivf_threshold"),
    [
        ("torch", 200_000),
        pytest.param("auto", 200_000, marks=needs_faiss),
        pytest.param("auto", 20, marks=needs_faiss),
    ],
)
def test_scorer_save_load_round_trip(tmp_path, backend: str, ivf_threshold: int) -> None:
    support = torch.from_numpy(_random((2, 8, 6, 6), 9))
    test = torch.from_numpy(_random((3, 8, 6, 6), 10))
    scorer = MemoryBankScorer(
        coreset_ratio=0.5, backend=backend, ivf_threshold=ivf_threshold, nprobe=4, progress=False
    ).fit(support)
    scorer.save(tmp_path)
    metadata = json.loads((tmp_path / "memory_bank.json").read_text())
    assert metadata["format_version"] == 1 and metadata["grid_size"] == [6, 6]
    assert metadata["index_kind"] == scorer.index.kind
    assert (tmp_path / "index.faiss").exists() == (scorer.index.kind != "torch")
    loaded = MemoryBankScorer.load(tmp_path)
    assert loaded.index.kind == scorer.index.kind and loaded.config() == scorer.config()
    before, after = scorer.score_features(test), loaded.score_features(test)
    assert torch.equal(before["patch_scores"], after["patch_scores"])
    assert torch.equal(before["image_scores"], after["image_scores"])


def test_progress_switch(capsys) -> None:
    support = torch.from_numpy(_random((2, 8, 4, 4), 11))
    MemoryBankScorer(coreset_ratio=0.5, backend="torch", progress=False).fit(support).patch_scores(support)
    assert "k-center" not in capsys.readouterr().err
    MemoryBankScorer(coreset_ratio=0.5, backend="torch", progress=True).fit(support).patch_scores(support)
    err = capsys.readouterr().err
    assert "k-center" in err and "kNN" in err


def test_cosine_distance_scores_normalised_vectors_and_keeps_the_raw_bank() -> None:
    support = _as_features(HAND_BANK[1:], 1, 3)  # (1, 0), (0, 2), (3, 3): no zero vector
    scorer = MemoryBankScorer(coreset_ratio=None, distance="cosine", num_neighbors=1, backend="torch", progress=False)
    scorer.fit(support)
    np.testing.assert_array_equal(scorer.bank, HAND_BANK[1:])  # the defect-type classifier reads raw rows
    # (5, 0) is a rescaled bank vector: cosine distance 0, Euclidean √13 (to (3, 3)). (0, 1) vs (0, 2): 0 as well.
    # (1, 1) / √2 is closest to (3, 3) / (3√2): identical direction, 0. (1, -1): 45° from (1, 0).
    test = _as_features(np.array([[5.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]], dtype=np.float32), 1, 4)
    expected = torch.tensor([[[0.0, 0.0, 0.0, math.sqrt(2.0 - 2.0 * math.cos(math.pi / 4))]]])
    torch.testing.assert_close(scorer.patch_scores(test), expected, atol=1e-6, rtol=0)
    euclidean = MemoryBankScorer(coreset_ratio=None, num_neighbors=1, backend="torch", progress=False).fit(support)
    assert float(euclidean.patch_scores(test)[0, 0, 0]) == pytest.approx(math.sqrt(13.0))
    assert float(scorer.image_scores(test)[0]) == pytest.approx(float(expected.max()), abs=1e-6)


def test_top_fraction_image_score_is_the_mean_of_the_largest_patch_scores() -> None:
    support = torch.from_numpy(_random((2, 8, 5, 5), 21))
    test = torch.from_numpy(_random((3, 8, 5, 5), 22))
    scorer = MemoryBankScorer(coreset_ratio=None, image_score="top_fraction", top_fraction=0.1, backend="torch",
                              progress=False).fit(support)
    patch = scorer.patch_scores(test).reshape(3, -1)
    expected = patch.sort(dim=1, descending=True).values[:, :2].mean(dim=1)  # round(0.1 · 25) = 2 patches
    torch.testing.assert_close(scorer.image_scores(test), expected)
    tiny = MemoryBankScorer(coreset_ratio=None, image_score="top_fraction", top_fraction=0.001, backend="torch",
                            progress=False).fit(support)
    torch.testing.assert_close(tiny.image_scores(test), patch.max(dim=1).values)  # at least one patch


@pytest.mark.parametrize(
    "options", [{"distance": "manhattan"}, {"image_score": "mean"}, {"top_fraction": 0.0}, {"top_fraction": 1.5}]
)
def test_invalid_scoring_options_raise(options: dict) -> None:
    with pytest.raises(ValueError):
        MemoryBankScorer(**options)


def test_cosine_scorer_leave_out_and_save_load(tmp_path) -> None:
    support = torch.from_numpy(_random((4, 8, 5, 5), 23))
    queries = torch.from_numpy(_random((3, 8, 5, 5), 24))
    options = dict(coreset_ratio=None, num_neighbors=3, distance="cosine", backend="torch", progress=False)
    full = MemoryBankScorer(**options).fit(support)
    fold, refit = full.leave_out_images(1, 3), MemoryBankScorer(**options).fit(support[[0, 3]])
    torch.testing.assert_close(fold.patch_scores(queries), refit.patch_scores(queries))
    torch.testing.assert_close(fold.image_scores(queries), refit.image_scores(queries))
    # scaling a feature vector leaves its cosine score unchanged
    torch.testing.assert_close(full.patch_scores(queries * 3.0), full.patch_scores(queries), atol=1e-5, rtol=0)
    full.save(tmp_path)
    loaded = MemoryBankScorer.load(tmp_path)
    assert loaded.config() == full.config() and loaded.distance == "cosine"
    assert torch.equal(loaded.patch_scores(queries), full.patch_scores(queries))
    assert torch.equal(loaded.image_scores(queries), full.image_scores(queries))


def test_a_bfloat16_search_returns_the_exact_float32_neighbours_and_distances() -> None:
    """precision bf16: the matmul in bfloat16, its BF16_CANDIDATES nearest re-ranked by exact
    float32 distances: on well-separated data the same neighbours, in the same order, at the same
    distances as the float32 search (a plain bfloat16 argmin would be off by its rounding)."""
    from fsad_pipeline.models.memory_bank import BF16_CANDIDATES

    bank, queries = _random((500, 64), 31), _random((200, 64), 32)
    exact = NearestNeighbourIndex(backend="torch").build(bank)
    low = NearestNeighbourIndex(backend="torch", precision="bf16", max_chunk_elements=20_000).build(bank)
    assert exact.candidates(1) == 1 and low.candidates(1) == BF16_CANDIDATES and low.candidates(3) == BF16_CANDIDATES + 2
    d_exact, i_exact = exact.search(queries, k=3)
    d_low, i_low = low.search(queries, k=3)
    assert d_low.shape == (200, 3) and d_low.dtype == torch.float32
    assert torch.equal(i_low, i_exact)
    torch.testing.assert_close(d_low, d_exact, atol=1e-6, rtol=0)
    # the bfloat16 product itself is not exact: re-ranking is what makes the result so
    approximate = torch.from_numpy(queries) @ torch.from_numpy(bank).T
    assert not torch.equal(low.inner_products(torch.from_numpy(queries)), approximate)


def test_the_shared_cosine_search_in_bfloat16_equals_the_float32_one() -> None:
    support = torch.from_numpy(_random((6, 32, 6, 6), 33))
    queries = torch.from_numpy(_random((4, 32, 6, 6), 34))
    options = dict(coreset_ratio=0.5, distance="cosine", backend="torch", progress=False)
    exact = MemoryBankScorer(**options).fit(support)
    low = MemoryBankScorer(**options, precision="bf16").fit(support)
    assert np.array_equal(low.bank, exact.bank)  # the coreset does not depend on the search precision
    for got, want in zip(low.patch_scores_and_raw_distances(queries), exact.patch_scores_and_raw_distances(queries)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(low.patch_scores(queries), exact.patch_scores(queries), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="precision"):
        MemoryBankScorer(precision="fp8")


def test_a_bank_saved_before_the_precision_setting_loads_and_searches_in_float32(tmp_path) -> None:
    support = torch.from_numpy(_random((3, 8, 4, 4), 35))
    scorer = MemoryBankScorer(coreset_ratio=None, distance="cosine", backend="torch", precision="bf16", progress=False)
    scorer.fit(support).save(tmp_path)
    assert MemoryBankScorer.load(tmp_path).index.search_dtype == torch.bfloat16  # recorded and restored
    metadata = json.loads((tmp_path / "memory_bank.json").read_text())
    del metadata["config"]["precision"]  # as written before the setting existed
    (tmp_path / "memory_bank.json").write_text(json.dumps(metadata))
    old = MemoryBankScorer.load(tmp_path)
    assert old.precision == "fp32" and old.index.search_dtype is None and old._require_fitted(support).search_dtype is None
