"""The HTML inspection report: structure and escaping, and a real load in headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from fsad_pipeline.evaluation.figures import roc_figure, score_histogram_figure
from fsad_pipeline.evaluation.html_report import render_html_report, save_html_report

HOSTILE = '<script>alert("x")</script> & co'
SIZE = 32


class _Rows(HTMLParser):
    """Collects the attributes of every ``<tr class="image-row">`` and every ``src``/``href``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.headers: list[str] = []
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.add(tag)
        if tag == "tr" and "image-row" in (attributes.get("class") or "").split():
            self.rows.append(attributes)
        self.links += [value for key, value in attrs if key in ("src", "href") and value]
        self._in_th = tag == "th"

    def handle_endtag(self, tag):
        self._in_th = False if tag == "th" else self._in_th

    def handle_data(self, data):
        if self._in_th:
            self.headers.append(data)


def _parse(page: str) -> _Rows:
    parser = _Rows()
    parser.feed(page)
    return parser


def _write_images(folder: Path, n: int) -> list[str]:
    """Magenta images with a little noise: a colour no figure or CSS uses, easy to find in a screenshot."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(n):
        path = folder / f"img_{index:02d}.png"
        noise = rng.integers(-8, 9, (SIZE, SIZE, 3))
        image = np.clip(np.array([255, 0, 255]) + noise, 0, 255).astype(np.uint8)
        assert cv2.imwrite(str(path), image)
        paths.append(str(path))
    return paths


@pytest.fixture
def evaluation_inputs(tmp_path):
    """Six images (three anomalous), maps with a hot spot growing with the score, metrics, figures."""
    paths = _write_images(tmp_path, 6)
    scores = np.array([0.1, 0.9, 0.3, 0.7, 0.2, 0.8])
    labels = np.array([0, 1, 0, 1, 0, 1])
    predictions = pd.DataFrame(
        {
            "path": paths,
            "gt_label": labels,
            "defect_type": ["good", "scratch", "good", HOSTILE, "good", "scratch"],
            "mask_path": [""] * 6,
            "pred_score": scores,
            "pred_label": (scores >= 0.5).astype(int),
            "score_dfd": scores * 2,
            "score_knn": scores / 2,
        }
    )
    predictions.loc[2, "pred_label"] = 1  # a false alarm: the row gets the mismatch marker
    maps = np.zeros((6, SIZE, SIZE), np.float32)
    for index, score in enumerate(scores):
        maps[index, 8:20, 8:20] = score
    metrics = {
        "image_auroc": 1.0, "pixel_auroc": None, "aupro": None, "f1_max": 1.0, "threshold": 0.5,
        "image_auroc_per_defect_type": {"scratch": 1.0, HOSTILE: 1.0},
        "scorers": {"dfd": {"image_auroc": 0.9, "f1_max": 0.8}, "knn": {"image_auroc": 0.75, "f1_max": 0.7}},
        "fusion_weights": {"dfd": 0.6, "knn": 0.4}, "backbone": "efficientnet_lite0", "k_shot": 2,
    }
    figures = {"ROC curve": roc_figure(labels, scores), "Score histogram": score_histogram_figure(scores, labels)}
    return predictions, maps, metrics, figures


def test_evaluation_report_structure(evaluation_inputs):
    predictions, maps, metrics, figures = evaluation_inputs
    page = render_html_report(predictions, maps, image_size=SIZE, metrics=metrics, figures=figures,
                              thumbnail_size=48, progress=False)
    parsed = _parse(page)

    assert page.isascii() and page.startswith("<!DOCTYPE html>")
    # One row per image, highest score first, ranks 1..N, verdicts from pred_label.
    assert len(parsed.rows) == len(predictions)
    assert [float(r["data-score"]) for r in parsed.rows] == sorted(predictions["pred_score"], reverse=True)
    assert [r["data-rank"] for r in parsed.rows] == [str(i) for i in range(1, 7)]
    assert [Path(r["data-path"]).name for r in parsed.rows][:2] == ["img_01.png", "img_05.png"]
    assert [r["data-verdict"] for r in parsed.rows] == ["NG", "NG", "NG", "NG", "OK", "OK"]
    assert sum("mismatch" in r["class"] for r in parsed.rows) == 1  # img_02: normal judged NG
    for header in ("heat map", "ground truth", "defect type", "scores per scorer", "fusion weight"):
        assert header in parsed.headers, header
    assert "predicted defect type" not in parsed.headers  # no classifier columns in this run
    # Metrics: fused and each scorer, a run table with the scalars.
    for text in (">fused<", ">dfd<", ">knn<", "0.75", "efficientnet_lite0", "evaluation run"):
        assert text in page, text

    # Everything embedded: 2 figures + 2 images per row; no external resource, no script.
    pngs = [link for link in parsed.links if link.startswith("data:image/png;base64,")]
    jpegs = [link for link in parsed.links if link.startswith("data:image/jpeg;base64,")]
    assert len(pngs) == 2 and len(jpegs) == 2 * len(predictions) and len(parsed.links) == len(pngs) + len(jpegs)
    assert not re.search(r"(https?:|//)[^\s\"'<>]*\.", re.sub(r"data:[^\"]+", "", page))
    assert "script" not in parsed.tags and "link" not in parsed.tags and "iframe" not in parsed.tags

    # Text from the data is escaped, never markup.
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page


def test_overlays_follow_the_shared_colour_scale(evaluation_inputs):
    """The hottest image's overlay is redder than the coolest one's (same colour scale for all)."""
    predictions, maps, _, _ = evaluation_inputs
    page = render_html_report(predictions, maps, image_size=SIZE, thumbnail_size=SIZE, jpeg_quality=95, progress=False)
    overlays = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"[^>]*alt="heat map of', page)
    assert len(overlays) == 6
    decoded = [cv2.imdecode(np.frombuffer(base64.b64decode(o), np.uint8), cv2.IMREAD_COLOR) for o in overlays]
    hottest, coolest = decoded[0][8:20, 8:20], decoded[-1][8:20, 8:20]  # BGR; rows are sorted by score
    assert hottest[..., 2].mean() > coolest[..., 2].mean() + 40
    assert coolest[..., 0].mean() > hottest[..., 0].mean() + 40


def test_inference_report_without_ground_truth_or_metrics(tmp_path):
    """An inference run: no metrics, no gt_label/defect_type/pred_label, classifier columns on flagged rows."""
    paths = _write_images(tmp_path, 4) + [str(tmp_path / "missing.png")]
    predictions = pd.DataFrame(
        {
            "path": paths,
            "pred_score": [0.2, 0.95, 0.6, 0.1, 0.4],
            "pred_defect_type": ["", "crack", HOSTILE, "", ""],
            "pred_defect_probability": [np.nan, 0.87, 0.55, np.nan, np.nan],
            "runner_up_defect_type": ["", "stain", "crack", "", ""],
        }
    )
    maps = np.random.default_rng(1).random((5, SIZE, SIZE)).astype(np.float32)
    page = render_html_report(predictions, maps, image_size=SIZE, threshold=0.5, progress=False,
                              figures={"Score histogram": score_histogram_figure(predictions["pred_score"], threshold=0.5)})
    parsed = _parse(page)

    assert len(parsed.rows) == 5
    assert [r["data-verdict"] for r in parsed.rows] == ["NG", "NG", "OK", "OK", "OK"]  # from the threshold
    assert "inference run" in page and "No ground truth" in page
    assert "ground truth" not in parsed.headers and "defect type" not in parsed.headers
    assert "predicted defect type" in parsed.headers
    assert "crack (0.87)" in page and "runner-up: stain" in page and "&lt;script&gt;" in page
    assert "<script>" not in page
    assert "unreadable: file does not exist" in page  # listed, the other images still shown
    assert "missing.png" in page


def test_report_without_maps_or_verdicts(tmp_path):
    predictions = pd.DataFrame({"path": _write_images(tmp_path, 3), "pred_score": [0.3, np.nan, 0.5]})
    page = render_html_report(predictions, None, image_size=SIZE, progress=False)
    parsed = _parse(page)
    assert [r["data-verdict"] for r in parsed.rows] == ["\u2014"] * 3
    assert [Path(r["data-path"]).name for r in parsed.rows] == ["img_02.png", "img_00.png", "img_01.png"]  # NaN last
    assert "heat map" not in parsed.headers


def test_inputs_are_checked(evaluation_inputs):
    predictions, maps, _, _ = evaluation_inputs
    with pytest.raises(ValueError, match="anomaly maps"):
        render_html_report(predictions, maps[:3], progress=False)
    with pytest.raises(ValueError, match="pred_score"):
        render_html_report(predictions.drop(columns="pred_score"), maps, progress=False)
    with pytest.raises(ValueError, match="PNG"):
        render_html_report(predictions, maps, figures={"bad": b"GIF89a"}, progress=False)


def test_save_html_report_writes_one_file(tmp_path, evaluation_inputs):
    predictions, maps, metrics, _ = evaluation_inputs
    page = render_html_report(predictions, maps, image_size=SIZE, metrics=metrics, progress=False)
    target = save_html_report(tmp_path / "out" / "report.html", page)
    assert target.read_text(encoding="ascii") == page
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]  # no temp file left


# --------------------------------------------------------------------------- #
# headless Chromium
# --------------------------------------------------------------------------- #
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian package `chromium`)")
def test_report_renders_in_headless_chromium(tmp_path, evaluation_inputs):
    predictions, maps, metrics, figures = evaluation_inputs
    thumb = 48  # small enough that every row fits the window
    report = save_html_report(
        tmp_path / "report.html",
        render_html_report(predictions, maps, image_size=SIZE, metrics=metrics, figures=figures,
                           thumbnail_size=thumb, progress=False),
    )
    url = report.resolve().as_uri()

    # (a) The screenshot shows a page, not a blank (white) canvas.
    screenshot = tmp_path / "shot.png"
    result = _chromium(tmp_path / "profile-a", f"--screenshot={screenshot}", "--window-size=1280,2000", url)
    assert screenshot.exists(), f"no screenshot (rc={result.returncode}): {result.stderr[-2000:]}"
    pixels = cv2.imread(str(screenshot), cv2.IMREAD_COLOR)
    assert pixels.shape[:2] == (2000, 1280)
    distinct = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert pixels.astype(np.float32).std() > 20 and len(distinct) > 200, (pixels.std(), len(distinct))
    assert (pixels[:40].mean(axis=(0, 1)) < 120).all()  # the dark header band: the CSS applied
    # Every embedded image was decoded and shown: the magenta thumbnails, and the overlays whose
    # cold background is jet's dark blue blended half and half with magenta (purple, RGB ~127,0,191).
    blue, green, red = (pixels[..., c].astype(int) for c in range(3))
    magenta = (red > 200) & (green < 60) & (blue > 200)
    purple = (abs(red - 127) < 30) & (green < 50) & (abs(blue - 191) < 30)
    n = len(predictions)
    assert magenta.sum() > 0.8 * n * thumb * thumb, magenta.sum()
    assert purple.sum() > 0.5 * n * (thumb * thumb - (thumb * 12 // SIZE) ** 2), purple.sum()

    # (b) The DOM the browser built has exactly one image row per prediction.
    result = _chromium(tmp_path / "profile-b", "--dump-dom", url)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _parse(result.stdout).rows
    assert len(rows) == len(predictions)
    assert len({r["data-path"] for r in rows}) == len(predictions)


def test_the_report_states_what_the_deployed_threshold_does(evaluation_inputs):
    """Issue 18: false-alarm rate on good images, miss rate on defects and the confusion counts."""
    from fsad_pipeline.evaluation.report import decision_rates

    predictions, maps, metrics, figures = evaluation_inputs
    rates = decision_rates(predictions["gt_label"].to_numpy(), predictions["pred_label"].to_numpy())
    calibration = {"method": "target_fpr", "target_false_alarm_rate": 0.05, "expected_false_alarm_rate": 0.049}
    page = render_html_report(predictions, maps, image_size=SIZE, metrics={**metrics, **rates, "threshold_calibration": calibration},
                              figures=figures, thumbnail_size=48, progress=False)
    assert "at the deployed threshold" in page and "false-alarm rate on good test images" in page
    good = int((predictions["gt_label"] == 0).sum())
    confusion = rates["confusion_at_threshold"]
    assert f"{confusion['false_positive']} / {confusion['true_negative']}" in page and confusion["false_positive"] == 1
    assert f"{1 / good:.3f}" in page and "target_fpr" in page and "0.049" in page
