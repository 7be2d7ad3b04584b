"""One self-contained HTML inspection report per run, for evaluation and for inference.

Figures, thumbnails and heat-map overlays are embedded as base64 ``data:`` URIs and the page
has no scripts and no external resources, so the single file can be mailed or archived and opens
offline in any browser. Every piece of text taken from the data is HTML-escaped, and the output
is pure ASCII (other characters become character references), so it reads the same whatever
encoding a mail client or web server assumes.

An evaluation run passes ``metrics`` and predictions with ``gt_label``; an inference run passes
no metrics and predictions without ground truth, and the report shows what it can: the verdict
summary, the score figures given and the ranked image table.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from fsad_pipeline import artifacts
from fsad_pipeline.data.geometry import as_hw
from fsad_pipeline.data.images import BadImageError, resize_image
from fsad_pipeline.data.sampling import load_images
from fsad_pipeline.evaluation.figures import heatmap_overlay_image

__all__ = ["render_html_report", "save_html_report"]

#: Metrics shown per scorer (fused first), in this order, when present, with their column names.
SCORER_METRICS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO", "f1_max": "F1 max"}
MISSING = "\u2014"  # an em dash for "not known"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       color: #1f2933; background: #f5f7fa; font-size: 14px; }
header { background: #243b53; color: #fff; padding: 16px 28px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 0; color: #d9e2ec; }
main { padding: 8px 28px 28px 28px; }
section { background: #fff; border: 1px solid #d9e2ec; border-radius: 6px; padding: 12px 18px;
          margin-top: 16px; }
h2 { font-size: 17px; margin: 4px 0 10px 0; color: #243b53; }
table { border-collapse: collapse; }
th, td { padding: 4px 10px; text-align: left; border-bottom: 1px solid #e4e7eb; vertical-align: middle; }
th { background: #f0f4f8; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { background: none; font-weight: normal; color: #52606d; }
.tables { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; }
figure img { max-width: 480px; height: auto; border: 1px solid #e4e7eb; }
figcaption { color: #52606d; font-size: 12px; margin-top: 2px; }
table.images tbody tr:nth-child(even) { background: #fafbfc; }
table.images tr.mismatch td:first-child { box-shadow: inset 4px 0 0 #d64545; }
table.images img { display: block; border: 1px solid #e4e7eb; }
.file { font-size: 11px; color: #52606d; max-width: 160px; overflow-wrap: anywhere; }
.badge { display: inline-block; padding: 2px 8px; border-radius: 10px; font-weight: 600; color: #fff; }
.badge.ng { background: #d64545; }
.badge.ok { background: #3f9142; }
.badge.unknown { background: #9aa5b1; }
.small { font-size: 12px; color: #52606d; }
.note { color: #52606d; }
"""


# --------------------------------------------------------------------------- #
# encoding
# --------------------------------------------------------------------------- #
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _figure_png(figure: Figure | bytes, dpi: int) -> bytes:
    """PNG bytes of a matplotlib figure, or the bytes themselves when they already are a PNG."""
    if isinstance(figure, (bytes, bytearray)):
        if not bytes(figure).startswith(PNG_SIGNATURE):
            raise ValueError("figure bytes are not a PNG image")
        return bytes(figure)
    if isinstance(figure, Figure):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi)
        return buffer.getvalue()
    raise TypeError(f"a figure must be a matplotlib Figure or PNG bytes, got {type(figure).__name__}")


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return encoded.tobytes()


def _thumbnail_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    scale = longest / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


# --------------------------------------------------------------------------- #
# values
# --------------------------------------------------------------------------- #
def _fmt(value: Any) -> str:
    """A metric or score as short text: 4 significant digits, the em dash for missing."""
    if value is None:
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return MISSING if not math.isfinite(float(value)) else f"{float(value):.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _known_label(value: Any) -> int | None:
    """A ground-truth or predicted label as 0/1, or None when it is not known (missing, NaN, -1, "")."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number < 0:
        return None
    return int(number > 0)


def _text(value: Any) -> str:
    """A text cell value, empty for missing ones (NaN from CSV, None)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return str(value).strip()


def _badge(label: int | None) -> str:
    if label is None:
        return f'<span class="badge unknown">{MISSING}</span>'
    return '<span class="badge ng">NG</span>' if label else '<span class="badge ok">OK</span>'


def _verdicts(predictions: pd.DataFrame, threshold: float | None) -> list[int | None]:
    if "pred_label" in predictions:
        return [_known_label(v) for v in predictions["pred_label"]]
    if threshold is not None:
        return [None if not math.isfinite(float(s)) else int(float(s) >= threshold) for s in predictions["pred_score"]]
    return [None] * len(predictions)


# --------------------------------------------------------------------------- #
# sections
# --------------------------------------------------------------------------- #
def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1, css: str = "") -> str:
    """An HTML table of already-escaped cells; columns from ``numeric_from`` on are right-aligned."""
    def cell(tag: str, index: int, content: str) -> str:
        align = ' class="num"' if index >= numeric_from else ""
        return f"<{tag}{align}>{content}</{tag}>"

    head = "".join(cell("th", i, _esc(h)) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    css_attr = f' class="{css}"' if css else ""
    return f"<table{css_attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_section(predictions: pd.DataFrame, verdicts: list[int | None], truths: list[int | None],
                     threshold: float | None) -> str:
    flagged = sum(v == 1 for v in verdicts)
    passed = sum(v == 0 for v in verdicts)
    rows = [("images", _fmt(len(predictions))), ("flagged NG", _fmt(flagged)), ("passed OK", _fmt(passed))]
    if threshold is not None:
        rows.append(("decision threshold", _fmt(threshold)))
    known = [(t, v) for t, v in zip(truths, verdicts) if t is not None]
    if known:
        rows.append(("with ground truth", _fmt(len(known))))
        rows.append(("anomalous (ground truth)", _fmt(sum(t for t, _ in known))))
        judged = [(t, v) for t, v in known if v is not None]
        if judged:
            rows.append(("missed defects (NG judged OK)", _fmt(sum(t == 1 and v == 0 for t, v in judged))))
            rows.append(("false alarms (OK judged NG)", _fmt(sum(t == 0 and v == 1 for t, v in judged))))
    tables = [_table(["", "count"], [(_esc(k), v) for k, v in rows], css="kv")]
    if "pred_defect_type" in predictions:
        types = [_text(t) for t in predictions["pred_defect_type"]]
        counts = pd.Series([t for t in types if t], dtype=object).value_counts()
        if len(counts):
            tables.append(_table(["predicted defect type", "images"],
                                 [(_esc(name), _fmt(int(n))) for name, n in counts.items()]))
    return f'<section id="summary"><h2>Summary</h2><div class="tables">{"".join(tables)}</div></section>'


def _metrics_section(metrics: Mapping[str, Any] | None) -> str:
    if metrics is None:
        return ('<section id="metrics"><h2>Metrics</h2><p class="note">No ground truth in this run '
                "(inference): accuracy metrics are not computed.</p></section>")
    scorers = {"fused": metrics, **dict(metrics.get("scorers") or {})}
    columns = [m for m in SCORER_METRICS if any(m in values for values in scorers.values())]
    weights = metrics.get("fusion_weights") or {}
    headers = ["scorer", *[SCORER_METRICS[c] for c in columns]] + (["fusion weight"] if weights else [])
    rows = []
    for name, values in scorers.items():
        row = [_esc(name), *[_esc(_fmt(values.get(c))) for c in columns]]
        if weights:
            row.append(_esc(_fmt(weights.get(name))) if name != "fused" else "")
        rows.append(row)
    tables = [_table(headers, rows)]

    per_type = {name: values.get("image_auroc_per_defect_type") or {} for name, values in scorers.items()}
    defect_types = sorted({t for values in per_type.values() for t in values})
    if defect_types:
        names = [n for n in scorers if per_type[n]]
        tables.append(_table(["image AUROC by defect type", *names],
                             [[_esc(t), *[_esc(_fmt(per_type[n].get(t))) for n in names]] for t in defect_types]))

    methods = (metrics.get("defect_type") or {}).get("methods") or {}
    if methods:
        columns = {"accuracy": "accuracy", "mean_type_accuracy": "mean over types",
                   "closed_set_accuracy": "closed-set accuracy", "unknown_rate": "unknown"}
        tables.append(_table(["defect-type method (flagged defects)", *columns.values()],
                             [[_esc(name), *[_esc(_fmt(values.get(c))) for c in columns]] for name, values in methods.items()]))

    confusion = metrics.get("confusion_at_threshold")
    if confusion:
        decision = metrics.get("threshold_calibration") or {}
        rows = [
            ("threshold", _fmt(metrics.get("threshold"))),
            ("calibrated by", _text(decision.get("method"))),
            ("target false-alarm rate", _fmt(decision.get("target_false_alarm_rate"))),
            ("expected false-alarm rate (calibration good images)", _fmt(decision.get("expected_false_alarm_rate"))),
            ("false-alarm rate on good test images", _fmt(metrics.get("false_alarm_rate"))),
            ("miss rate on defect test images", _fmt(metrics.get("miss_rate"))),
            ("good flagged NG / good passed OK", f"{confusion['false_positive']} / {confusion['true_negative']}"),
            ("defects flagged NG / defects passed OK", f"{confusion['true_positive']} / {confusion['false_negative']}"),
        ]
        tables.append(_table(["at the deployed threshold", "value"], [[_esc(k), _esc(v)] for k, v in rows], css="kv"))

    shown = set(SCORER_METRICS) | {"scorers", "fusion_weights", "image_auroc_per_defect_type",
                                   "false_alarm_rate", "miss_rate", "threshold"}
    run = [(_esc(k.replace("_", " ")), _esc(_fmt(v))) for k, v in metrics.items()
           if k not in shown and not isinstance(v, Mapping)]
    if run:
        tables.append(_table(["run", "value"], run, css="kv"))
    return f'<section id="metrics"><h2>Metrics</h2><div class="tables">{"".join(tables)}</div></section>'


def _figures_section(figures: Mapping[str, Figure | bytes] | None, dpi: int) -> str:
    if not figures:
        return ""
    items = []
    for name, figure in figures.items():
        uri = _data_uri(_figure_png(figure, dpi), "image/png")
        items.append(f'<figure><img src="{uri}" alt="{_esc(name)}"><figcaption>{_esc(name)}</figcaption></figure>')
    return f'<section id="figures"><h2>Figures</h2><div class="figures">{"".join(items)}</div></section>'


def _display_names(paths: list[str]) -> list[str]:
    """Paths relative to their common folder (``scratch/000.png``), short yet unambiguous."""
    try:
        common = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    except ValueError:  # mixed absolute and relative paths
        common = ""
    return [os.path.relpath(p, common) if common else p for p in paths]


def _scorer_columns(predictions: pd.DataFrame) -> list[str]:
    return [c for c in predictions.columns if c.startswith("score_")]


# --------------------------------------------------------------------------- #
# the report
# --------------------------------------------------------------------------- #
def render_html_report(
    predictions: pd.DataFrame,
    anomaly_maps: np.ndarray | None = None,
    *,
    image_size: int | tuple[int, int] = 256,
    metrics: Mapping[str, Any] | None = None,
    figures: Mapping[str, Figure | bytes] | None = None,
    threshold: float | None = None,
    title: str = "Inspection report",
    map_range: tuple[float, float] | None = None,
    thumbnail_size: int = 128,
    jpeg_quality: int = 75,
    figure_dpi: int = 80,
    progress: bool = True,
) -> str:
    """The whole report as one HTML string.

    ``predictions`` needs ``path`` and ``pred_score``; ``pred_label``, ``gt_label``,
    ``defect_type``, ``score_<scorer>`` and the classifier's ``pred_defect_type``,
    ``pred_defect_probability`` and ``runner_up_defect_type`` are shown when present.
    ``anomaly_maps`` (N, H, W) are in the order of ``predictions``' rows; images are read at the
    maps' size (else ``image_size``) so overlays line up with what the model saw. ``metrics`` is
    the ``metrics.json`` dict (None for inference); ``threshold`` defaults to ``metrics["threshold"]``.
    Heat maps share one colour scale, ``map_range`` (default 0 to max(1, the largest map value):
    the fused maps are normalised so the validation maximum is about 1).
    """
    if "path" not in predictions or "pred_score" not in predictions:
        raise ValueError("predictions need at least the columns 'path' and 'pred_score'")
    if anomaly_maps is not None and len(anomaly_maps) != len(predictions):
        raise ValueError(f"{len(anomaly_maps)} anomaly maps for {len(predictions)} prediction rows")
    if threshold is None and metrics is not None and metrics.get("threshold") is not None:
        threshold = float(metrics["threshold"])

    predictions = predictions.reset_index(drop=True)
    verdicts = _verdicts(predictions, threshold)
    truths = [_known_label(v) for v in predictions["gt_label"]] if "gt_label" in predictions else [None] * len(predictions)
    if anomaly_maps is not None:
        anomaly_maps = np.asarray(anomaly_maps, dtype=np.float32)
        size = tuple(anomaly_maps.shape[1:3])
        if map_range is None:
            top = float(np.nanmax(anomaly_maps)) if anomaly_maps.size else 1.0
            map_range = (0.0, max(1.0, top))
    else:
        size = as_hw(image_size)

    n_flagged = sum(v == 1 for v in verdicts)
    kind = "evaluation run" if metrics is not None else "inference run"
    subtitle = f"{kind} \u00b7 {len(predictions)} images \u00b7 {n_flagged} flagged NG"
    if threshold is not None:
        subtitle += f" \u00b7 threshold {_fmt(threshold)}"

    body = [
        f"<header><h1>{_esc(title)}</h1><p>{_esc(subtitle)}</p></header><main>",
        _summary_section(predictions, verdicts, truths, threshold),
        _metrics_section(metrics),
        _figures_section(figures, figure_dpi),
        _images_section(predictions, anomaly_maps, size, verdicts, truths, map_range,
                        thumbnail_size, jpeg_quality, progress),
        '<p class="small">Generated by fsad_pipeline. Self-contained: every image is embedded.</p></main>',
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        + "".join(body)
        + "</body></html>\n"
    )
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def _images_section(
    predictions: pd.DataFrame,
    anomaly_maps: np.ndarray | None,
    size: tuple[int, int],
    verdicts: list[int | None],
    truths: list[int | None],
    map_range: tuple[float, float] | None,
    thumbnail_size: int,
    jpeg_quality: int,
    progress: bool,
) -> str:
    """The ranked image table: one ``<tr class="image-row">`` per prediction row, highest score first."""
    scores = pd.to_numeric(predictions["pred_score"], errors="coerce")
    order = (
        pd.DataFrame({"score": scores, "path": predictions["path"].astype(str)})
        .sort_values(["score", "path"], ascending=[False, True], na_position="last", kind="mergesort")
        .index.tolist()
    )
    has_truth = any(t is not None for t in truths)
    has_defect_type = "defect_type" in predictions and any(_text(t) for t in predictions["defect_type"])
    has_predicted_type = "pred_defect_type" in predictions
    scorer_columns = _scorer_columns(predictions)
    thumb_shape = _thumbnail_shape(*size, thumbnail_size)
    names = _display_names(predictions["path"].astype(str).tolist())

    headers = ["#", "image", *(["heat map"] if anomaly_maps is not None else []), "score", "verdict"]
    headers += ["ground truth"] if has_truth else []
    headers += ["defect type"] if has_defect_type else []
    headers += ["predicted defect type"] if has_predicted_type else []
    headers += ["scores per scorer"] if scorer_columns else []
    head = "".join(f'<th class="num">{_esc(h)}</th>' if h in ("#", "score") else f"<th>{_esc(h)}</th>"
                   for h in headers)

    rows = []
    for rank, index in enumerate(tqdm(order, desc="HTML report images", disable=not progress, leave=False), start=1):
        record = predictions.iloc[index]
        path = str(record["path"])
        verdict, truth = verdicts[index], truths[index]
        cells = [f'<td class="num">{rank}</td>']
        try:
            image = load_images([path], size)[0]
        except BadImageError as error:
            image = None
            reason = error.reason
        name = _esc(names[index])
        file_div = f'<div class="file" title="{_esc(path)}">{name}</div>'
        height, width = thumb_shape
        if image is None:
            unreadable = f'<td><div class="small">unreadable: {_esc(reason)}</div>{file_div}</td>'
            cells.append(unreadable)
            if anomaly_maps is not None:
                cells.append("<td></td>")
        else:
            thumb = _data_uri(_jpeg(resize_image(image, thumb_shape), jpeg_quality), "image/jpeg")
            cells.append(f'<td><img src="{thumb}" width="{width}" height="{height}" alt="{name}">{file_div}</td>')
            if anomaly_maps is not None:
                low, high = map_range
                overlay = heatmap_overlay_image(image, anomaly_maps[index], vmin=low, vmax=high)
                uri = _data_uri(_jpeg(resize_image(overlay, thumb_shape), jpeg_quality), "image/jpeg")
                cells.append(f'<td><img src="{uri}" width="{width}" height="{height}" alt="heat map of {name}"></td>')
        cells.append(f'<td class="num">{_esc(_fmt(scores.iloc[index]))}</td>')
        cells.append(f"<td>{_badge(verdict)}</td>")
        if has_truth:
            cells.append(f"<td>{_badge(truth)}</td>")
        if has_defect_type:
            cells.append(f"<td>{_esc(_text(record['defect_type']))}</td>")
        if has_predicted_type:
            cells.append(f"<td>{_predicted_type_cell(record)}</td>")
        if scorer_columns:
            parts = [f"{_esc(c[len('score_'):])} {_esc(_fmt(record[c]))}" for c in scorer_columns]
            cells.append(f'<td class="small">{"<br>".join(parts)}</td>')
        mismatch = truth is not None and verdict is not None and truth != verdict
        verdict_text = MISSING if verdict is None else ("NG" if verdict else "OK")
        attributes = (f'class="image-row{" mismatch" if mismatch else ""}" data-rank="{rank}" '
                      f'data-path="{_esc(path)}" data-score="{_esc(_fmt(scores.iloc[index]))}" '
                      f'data-verdict="{_esc(verdict_text)}"')
        rows.append(f"<tr {attributes}>{''.join(cells)}</tr>")

    legend = ""
    if anomaly_maps is not None and map_range is not None:
        legend = (f" Heat maps share one colour scale (jet): blue = {_fmt(map_range[0])}, "
                  f"red = {_fmt(map_range[1])} or more.")
    mismatch_note = " A red bar marks a verdict that disagrees with the ground truth." if has_truth else ""
    return (
        f'<section id="images"><h2>Images by anomaly score ({len(order)})</h2>'
        f'<p class="note">Highest score first.{_esc(legend)}{_esc(mismatch_note)}</p>'
        f'<table class="images"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></section>'
    )


def _predicted_type_cell(record: pd.Series) -> str:
    predicted = _text(record.get("pred_defect_type"))
    if not predicted:
        return ""
    text = _esc(predicted)
    probability = record.get("pred_defect_probability")
    if probability is not None and _text(probability):
        try:
            text += f" ({_esc(_fmt(float(probability)))})"
        except (TypeError, ValueError):
            pass
    runner_up = _text(record.get("runner_up_defect_type"))
    if runner_up:
        text += f'<div class="small">runner-up: {_esc(runner_up)}</div>'
    return text


def save_html_report(path: str | Path, report: str) -> Path:
    """Write a rendered report atomically (for callers outside Kedro, e.g. the inspection CLI)."""
    artifacts.write_text(path, report, encoding="ascii")
    return Path(path)
