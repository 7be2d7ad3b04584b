"""Scoring files in chunks (fsad_pipeline.scoring.batch)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fsad_pipeline.scoring.batch import fused_scores_of_paths, score_paths
from fsad_pipeline.scoring.ensemble import ScorerEnsemble
from fsad_pipeline.scoring.fusion import Fusion, ScoreStats

SIZE = (16, 12)


class _MeanScorer:
    """Scores an image by the mean of one colour channel; counts the images it was shown."""

    def __init__(self, name: str, channel: int) -> None:
        self.name, self.channel, self.image_size, self.seen = name, channel, SIZE, 0

    def score(self, images: np.ndarray) -> dict:
        self.seen += len(images)
        values = images[..., self.channel].astype(np.float32) / 255.0
        return {"anomaly_map": values, "pred_score": values.mean(axis=(1, 2))}

    def save(self, directory) -> None:  # pragma: no cover - not needed here
        raise NotImplementedError


def _files(tmp_path, count: int = 7) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = tmp_path / f"image_{index}.png"
        Image.fromarray(rng.integers(0, 256, (20, 15, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_the_fused_scores_of_files_run_only_the_scorers_the_image_score_weighs(tmp_path):
    """The threshold's calibration reads the fused image score only: a scorer with no
    image-score weight (here one that only the map uses) is not run, and the scores equal the
    full scoring's to the bit."""
    paths = _files(tmp_path)
    weighed, map_only = _MeanScorer("red", 0), _MeanScorer("green", 1)
    stats = {name: ScoreStats(map_loc=0.5, map_scale=0.2, score_loc=0.5, score_scale=0.1) for name in ("red", "green")}
    fusion = Fusion(stats, score_weights={"red": 1.0, "green": 0.0}, map_weights={"red": 0.5, "green": 0.5})
    ensemble = ScorerEnsemble(image_size=SIZE, image_scorers={"red": weighed, "green": map_only}, fusion=fusion)
    full = score_paths(ensemble, paths, chunk_size=3, progress=False)["pred_scores"]
    assert weighed.seen == map_only.seen == len(paths)
    lean = fused_scores_of_paths(ensemble, paths, chunk_size=3, progress=False)
    assert map_only.seen == len(paths) and weighed.seen == 2 * len(paths)  # the map-only scorer was not run again
    np.testing.assert_array_equal(lean, full)
    assert ensemble.fusion is fusion and fusion.map_weights == {"red": 0.5, "green": 0.5}  # nothing changed in place
