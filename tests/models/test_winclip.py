"""WinCLIP on a tiny randomly initialised open_clip ViT (registered from a JSON config, no download)."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from fsad_pipeline.models.winclip import (
    CLIP_MEAN,
    ClipWeightsUnavailable,
    WinClipScorer,
    _adapt_state_dict,
    build_prompts,
    class_scores,
    harmonic_aggregation,
    load_clip_model,
    make_window_masks,
    visual_association_score,
)

TINY_MODEL = "fsad-tiny-winclip-test"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    config_dir = tmp_path_factory.mktemp("clip_config")
    (config_dir / f"{TINY_MODEL}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config_dir)
    return TINY_MODEL


@pytest.fixture(scope="module")
def tiny_model(tiny_name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model(tiny_name, pretrained=None).eval()


@pytest.fixture(scope="module")
def scorer(tiny_model: torch.nn.Module, tiny_name: str) -> WinClipScorer:
    return WinClipScorer(tiny_model, open_clip.get_tokenizer(tiny_name), class_name="metal_nut")


def _images(count: int, size: tuple[int, int] = (50, 70), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *size, 3), dtype=np.uint8)


def test_prompt_ensemble_counts() -> None:
    normal, anomalous = build_prompts("metal_nut")
    assert (len(normal), len(anomalous)) == (147, 84)
    assert normal[0] == "a cropped photo of the metal_nut."
    assert anomalous[0] == "a cropped photo of the damaged metal_nut."
    assert normal.count("a jpeg corrupted photo of the flawless metal_nut.") == 2


def test_window_masks() -> None:
    assert make_window_masks((15, 15), 2).shape == (196, 4)
    masks3 = make_window_masks((15, 15), 3)
    assert masks3.shape == (169, 9) and masks3.dtype == torch.long
    assert make_window_masks((15, 15), 2)[0].tolist() == [0, 1, 15, 16]
    assert masks3[-1].tolist() == [192, 193, 194, 207, 208, 209, 222, 223, 224]
    assert make_window_masks((4, 4), 2, stride=2).shape == (4, 4)
    with pytest.raises(ValueError, match="does not fit"):
        make_window_masks((2, 2), 3)


def test_harmonic_aggregation_by_hand() -> None:
    masks = make_window_masks((2, 3), 2)  # windows [0,1,3,4] and [1,2,4,5]
    scores = torch.tensor([[0.5, 0.25], [0.0, 0.5]])
    result = harmonic_aggregation(scores, masks, (2, 3))
    expected_first = torch.tensor([[0.5, 1 / 3, 0.25], [0.5, 1 / 3, 0.25]])
    torch.testing.assert_close(result[0], expected_first)
    torch.testing.assert_close(result[1], torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.0, 0.5]]))
    # stride 2 on a 3×3 grid covers only the top-left window; uncovered patches are 0, never NaN
    sparse = harmonic_aggregation(torch.tensor([[0.0]]), make_window_masks((3, 3), 2, stride=2), (3, 3))
    assert torch.equal(sparse, torch.zeros(1, 3, 3))


def test_class_and_association_scores() -> None:
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    probabilities = class_scores(torch.tensor([[2.0, 0.0], [1.0, 1.0]]), text, temperature=0.07)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2))
    assert probabilities[0, 0] > 0.99 and abs(float(probabilities[1, 1]) - 0.5) < 1e-6
    reference = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (k=1, N=2, D=2)
    queries = torch.tensor([[[3.0, 0.0], [-1.0, 0.0], [1.0, 1.0]]])
    expected = torch.tensor([[0.0, 0.5, (1 - 2**-0.5) / 2]])
    torch.testing.assert_close(visual_association_score(queries, reference), expected)


def test_zero_shot_scores(scorer: WinClipScorer) -> None:
    assert scorer.name == "winclip" and not scorer.is_fitted
    assert scorer.grid == (4, 4) and scorer.text_embeddings.shape == (2, 32)
    assert [m.shape[0] for m in scorer.masks] == [9, 4]
    torch.testing.assert_close(scorer._mean.flatten(), torch.tensor(CLIP_MEAN))
    out = scorer.score(_images(3))
    assert out["anomaly_map"].shape == (3, 50, 70) and out["anomaly_map"].dtype == np.float32
    assert out["pred_score"].shape == (3,) and out["pred_score"].dtype == np.float32
    for values in out.values():
        assert np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0
    native = scorer.score(_images(1, size=(64, 64)))  # native size: no resize
    assert native["anomaly_map"].shape == (1, 64, 64)
    empty = scorer.score(_images(0))
    assert empty["anomaly_map"].shape == (0, 50, 70) and empty["pred_score"].shape == (0,)


def test_few_shot_fit_and_association(tiny_model: torch.nn.Module, tiny_name: str) -> None:
    few_shot = WinClipScorer(
        tiny_model, open_clip.get_tokenizer(tiny_name), image_size=64, batch_size=2, window_batch_size=7
    )
    references = _images(3, seed=1)
    assert few_shot.fit(references) is few_shot and few_shot.is_fitted
    assert few_shot._reference_patches.shape == (3, 16, 64)
    assert [w.shape for w in few_shot._reference_windows] == [(3, 9, 32), (3, 4, 32)]
    query = np.concatenate([references[:1], _images(1, seed=7)])
    out = few_shot.score(query)
    assert out["anomaly_map"].shape == (2, 50, 70) and out["pred_score"].shape == (2,)
    assert np.isfinite(out["anomaly_map"]).all()
    _, windows, patches = few_shot._encode_images(few_shot._preprocess(query))
    patch_map = visual_association_score(patches, few_shot._reference_patches)
    assert torch.allclose(patch_map[0], torch.zeros(16), atol=1e-5)  # identical image → 0
    few_shot_map = few_shot._few_shot(patches, windows)
    assert few_shot_map[0].mean() < few_shot_map[1].mean()
    with pytest.raises(ValueError, match="at least one"):
        few_shot.fit(_images(0))


def test_invalid_inputs(tiny_model: torch.nn.Module, tiny_name: str, scorer: WinClipScorer) -> None:
    with pytest.raises(ValueError, match="native size"):
        WinClipScorer(tiny_model, open_clip.get_tokenizer(tiny_name), image_size=(32, 64))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        scorer.score(np.zeros((1, 8, 8), np.uint8))


def test_load_clip_model_without_weights(tmp_path) -> None:
    with pytest.raises(ClipWeightsUnavailable, match="No CLIP checkpoint"):
        load_clip_model("ViT-B-16-plus-240", None)
    with pytest.raises(ClipWeightsUnavailable, match="not found"):
        load_clip_model("ViT-B-16-plus-240", tmp_path / "missing.safetensors")
    assert issubclass(ClipWeightsUnavailable, RuntimeError)


def test_load_clip_model_roundtrip(tmp_path, tiny_model: torch.nn.Module, tiny_name: str) -> None:
    state = {key: value.clone().contiguous() for key, value in tiny_model.state_dict().items()}
    safetensors_path = tmp_path / "tiny.safetensors"
    save_file(state, str(safetensors_path))
    model, tokenizer, (mean, std), size = load_clip_model(tiny_name, str(safetensors_path))
    assert size == (64, 64) and mean == pytest.approx(CLIP_MEAN) and len(std) == 3
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    assert tokenizer(["a photo"]).shape == (1, 77)

    # OpenAI-style extras: wrapped in "state_dict", "module." prefix, 1-d logit_scale, non-parameter keys
    wrapped = {f"module.{key}": value for key, value in state.items()}
    wrapped["module.logit_scale"] = state["logit_scale"].reshape(1)
    wrapped["input_resolution"] = torch.tensor(64)
    torch_path = tmp_path / "tiny.pt"
    torch.save({"state_dict": wrapped}, torch_path)
    loaded = load_clip_model(tiny_name, torch_path)
    torch.testing.assert_close(loaded.model.logit_scale, tiny_model.logit_scale)


def test_adapt_openai_layout_to_custom_text(tiny_name: str, tiny_model: torch.nn.Module) -> None:
    custom = open_clip.create_model(tiny_name, pretrained=None, force_custom_text=True)
    adapted = _adapt_state_dict(custom, dict(tiny_model.state_dict()))
    assert "text.text_projection" in adapted and "text_projection" not in adapted
    custom.load_state_dict(adapted, strict=True)


def test_full_grid_window_equals_image_embedding(tiny_model: torch.nn.Module, tiny_name: str) -> None:
    """A window covering every patch is cls + all patch tokens, i.e. the plain image forward."""
    whole = WinClipScorer(tiny_model, open_clip.get_tokenizer(tiny_name), scales=(4,))
    image_embeddings, windows, _ = whole._encode_images(whole._preprocess(_images(2)))
    assert windows[0].shape == (2, 1, 32)
    torch.testing.assert_close(windows[0][:, 0], image_embeddings, atol=1e-5, rtol=1e-4)
