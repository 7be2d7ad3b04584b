"""The dfd chain on non-square images: the working size keeps their aspect end to end."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from fsad_pipeline.data.sampling import load_images
from fsad_pipeline.scoring.dfd_scorer import DFDScorer

pytestmark = pytest.mark.slow

#: The raw images are made 64 wide and 96 high (aspect 1.5): the working size is 96 x 64.
WIDTH, HEIGHT = 64, 96


def _make_portrait(root) -> None:
    """Resize every raw image (linear) and mask (nearest) of the tiny category to WIDTH x HEIGHT."""
    for path in sorted((root / "data" / "01_raw").rglob("*.png")):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        is_mask = "ground_truth" in path.parts
        resized = cv2.resize(image, (WIDTH, HEIGHT), interpolation=cv2.INTER_NEAREST if is_mask else cv2.INTER_LINEAR)
        cv2.imwrite(str(path), resized)


def test_non_square_images_keep_their_aspect_through_the_dfd_chain(tiny_project):
    _make_portrait(tiny_project.root)
    tiny_project.run("dfd")
    working = json.loads(tiny_project.path("data/02_intermediate/working_size.json").read_text())
    assert working["image_size"] == [HEIGHT, WIDTH] and working["layout"] == "keep_aspect"
    assert working["median_aspect"] == pytest.approx(HEIGHT / WIDTH)

    maps = np.load(tiny_project.path("data/07_model_output/anomaly_maps.npy"))
    assert maps.shape == (10, HEIGHT, WIDTH)
    metrics = json.loads(tiny_project.path("data/08_reporting/metrics.json").read_text())
    assert metrics["image_size"] == [HEIGHT, WIDTH] and 0.0 <= metrics["pixel_auroc"] <= 1.0
    scorer = DFDScorer.load(tiny_project.path("data/06_models/dfd"), device="cpu")
    assert scorer.image_size == (HEIGHT, WIDTH)

    predictions = pd.read_csv(tiny_project.path("data/07_model_output/predictions.csv"), keep_default_na=False)
    again = scorer.score(load_images(predictions["path"].tolist(), (HEIGHT, WIDTH)))["pred_score"]
    np.testing.assert_allclose(again, predictions["score_dfd"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_squeeze_layout_is_the_old_square_behaviour(tiny_project):
    _make_portrait(tiny_project.root)
    tiny_project.run("ingestion", params={"image_layout": "squeeze"})
    working = json.loads(tiny_project.path("data/02_intermediate/working_size.json").read_text())
    assert working["image_size"] == [64, 64] and working["layout"] == "squeeze"
