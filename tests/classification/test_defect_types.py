from pathlib import Path

import numpy as np
import pytest
import yaml

from fsad_pipeline.classification.defect_types import METHODS, DefectTypeConfig, fit_defect_type_classifiers, load_defect_classifier
from fsad_pipeline.evaluation.figures import confusion_matrix_figure
from fsad_pipeline.evaluation.metrics import defect_type_accuracy
from fsad_pipeline.models.features import extract_features
from fsad_pipeline.models.memory_bank import MemoryBankScorer
from fsad_pipeline.scoring.dfd_scorer import FeatureConfig
from fsad_pipeline.synthesis.textures import KIND_PROCEDURAL, PROCEDURAL_GENERATORS, TextureBank, TextureSource

FEATURES = FeatureConfig(pretrain_dim=16, target_dim=16, image_size=64, batch_size=8)
CONFIG = DefectTypeConfig.from_dict(
    {
        "pseudo_classes": {"samples_per_class": 3},
        "encoder": {"hidden_channels": [8], "embed_dim": 4, "pooling": "mean", "input_pool": 2},
        "pretrain": {"n_way": 3, "n_query": 4, "max_episodes": 3},
        "fine_tune": {"epochs": 1},
    }
)


def _normal(rng, n):
    return np.clip(rng.normal(128, 6, (n, 64, 64, 3)), 0, 255).astype(np.uint8)


def _defects(rng, n, colour, size):
    images = _normal(rng, n)
    for image in images:
        y, x = rng.integers(4, 64 - size - 4, size=2)
        image[y : y + size, x : x + size] = colour
    return images


def _fit(rng):
    """A classifier of two types (red, blue) on two normals: (fitted, extractor, kNN bank)."""
    support = _normal(rng, 2)
    textures = TextureBank([TextureSource(f"procedural:{n}", KIND_PROCEDURAL, generator=g) for n, g in list(PROCEDURAL_GENERATORS.items())[:3]])
    extractor = FEATURES.build_extractor()
    bank = MemoryBankScorer(coreset_ratio=None, backend="torch", progress=False).fit(
        extract_features(extractor, support, image_size=64, dual_path=False, progress=False)
    )
    shots = np.concatenate([_defects(rng, 2, (250, 20, 20), 12), _defects(rng, 2, (20, 20, 250), 24)])
    types = ["red", "red", "blue", "blue"]
    fitted = fit_defect_type_classifiers(support, shots, types, textures, bank, FEATURES, CONFIG, extractor=extractor, progress=False)
    return fitted, extractor, bank


def test_fit_classify_save_load(tmp_path):
    rng = np.random.default_rng(0)
    fitted, extractor, bank = _fit(rng)
    assert set(fitted.classifiers) == set(METHODS) and fitted.class_names == ["blue", "red"]
    assert fitted.info["pretrain"]["steps"] == 3 and fitted.info["fine_tune"]["steps"] == 2 * 2
    assert fitted.info["pseudo_classes"]["samples"] == 9

    queries = np.concatenate([_defects(rng, 2, (250, 20, 20), 12), _defects(rng, 2, (20, 20, 250), 24)])
    features = extract_features(extractor, queries, image_size=64, dual_path=False, progress=False)
    predictions = fitted.classify(features)
    assert set(predictions) == set(METHODS)
    assert all(len(p.pred_type) == 4 for p in predictions.values())
    fitted.save(tmp_path / "types")
    loaded = load_defect_classifier(tmp_path / "types")
    np.testing.assert_array_equal(loaded.bank, bank.bank)
    again = loaded.classify(features)
    for name in METHODS:
        np.testing.assert_array_equal(again[name].probabilities, predictions[name].probabilities)
        assert again[name].pred_type == predictions[name].pred_type
    # the model bundle's contract: images in, the classifier's three columns out
    columns = loaded.predict(queries, np.zeros((4, 64, 64), np.float32))
    assert list(columns) == ["pred_defect_type", "pred_defect_probability", "runner_up_defect_type"]
    assert list(columns["pred_defect_type"]) == predictions["classifier"].pred_type
    np.testing.assert_allclose(columns["pred_defect_probability"], predictions["classifier"].pred_probability)


def test_config_matches_the_parameters_file():
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "conf" / "base" / "parameters_classification.yml").read_text())
    config = DefectTypeConfig.from_dict(params["classification"])
    assert config.pseudo_classes["mask_kinds"] == ["perlin", "blob"] and config.encoder["pooling"] == "mean"
    assert CONFIG.pseudo_classes["area_range"] == [0.10, 0.40]  # partial override keeps the defaults
    with pytest.raises(ValueError):
        DefectTypeConfig.from_dict({"sample_per_class": 3})


def test_defect_type_accuracy_and_confusion():
    result = defect_type_accuracy(["a", "a", "a", "b"], ["a", "b", "unknown", "b"])
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["per_type"] == {"a": pytest.approx(1 / 3), "b": 1.0}
    assert result["mean_type_accuracy"] == pytest.approx(2 / 3)
    assert result["unknown_rate"] == pytest.approx(0.25)
    assert result["confusion"] == {"true": ["a", "b"], "predicted": ["a", "b", "unknown"], "matrix": [[1, 1, 1], [0, 1, 0]]}
    figure = confusion_matrix_figure({"classifier": result["confusion"], "baseline": result["confusion"]})
    assert len(figure.axes) == 2 and "acc 0.50" in figure.axes[0].get_title()


def test_the_node_classifies_in_chunks_with_the_same_result(tmp_path, monkeypatch):
    import pandas as pd
    from PIL import Image

    from fsad_pipeline.pipelines.classification import nodes

    rng = np.random.default_rng(1)
    fitted, _, _ = _fit(rng)
    queries = np.concatenate([_defects(rng, 3, (250, 20, 20), 12), _defects(rng, 2, (20, 20, 250), 24)])
    paths = []
    for index, image in enumerate(queries):
        paths.append(str(tmp_path / f"q{index}.png"))
        Image.fromarray(image).save(paths[-1])
    predictions = pd.DataFrame({"path": paths, "gt_label": 1, "defect_type": "red", "pred_label": [1, 1, 0, 1, 1]})
    whole = nodes.classify_defect_types(predictions, fitted, {"classify": "flagged"}, 64)
    monkeypatch.setattr(nodes, "CLASSIFY_CHUNK", 2)
    chunked = nodes.classify_defect_types(predictions, fitted, {"classify": "flagged"}, 64)
    pd.testing.assert_frame_equal(whole, chunked)
    assert not whole["classified"].iloc[2] and whole["pred_defect_type"].iloc[2] == ""
    assert (whole["pred_defect_type"][whole["classified"]] != "").all()


def test_pseudo_class_residuals_in_chunks_equal_one_pass():
    """The pretraining residuals are taken a few feature batches at a time (the run's peak memory
    was the whole float32 feature tensor and its difference); the result is the one-pass one."""
    import torch

    from fsad_pipeline.classification import defect_types
    from fsad_pipeline.models.defect_classifier import paired_residuals

    rng = np.random.default_rng(2)
    support, images = _normal(rng, 2), _defects(rng, 11, (250, 20, 20), 12)
    source_index = [index % 2 for index in range(len(images))]
    extractor = FEATURES.build_extractor()
    common = dict(image_size=64, batch_size=2, device="cpu", dual_path=False)
    sources = extract_features(extractor, support, progress=False, **common)
    one_pass = paired_residuals(extract_features(extractor, images, progress=False, **common), sources, source_index)
    chunked = defect_types._pseudo_class_residuals(extractor, images, sources, source_index, common, progress=False)
    assert chunked.dtype == torch.float16 and chunked.shape == one_pass.shape  # 11 images: chunks of 8 and 3
    torch.testing.assert_close(chunked, one_pass.to(torch.float16), rtol=0, atol=0)
    assert defect_types.RESIDUAL_CHUNK_BATCHES * common["batch_size"] < len(images)
