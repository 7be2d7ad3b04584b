"""Thin nodes of the fleet pipeline."""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure

from fsad_pipeline.evaluation.figures import metric_bar_figure
from fsad_pipeline.evaluation.report import fleet_metrics_table


def gather_fleet_metrics(**metrics_by_category: dict) -> tuple[pd.DataFrame, Figure]:
    """Every category's ``metrics.json`` → one table (a row per category) and a bar chart."""
    table = fleet_metrics_table(metrics_by_category)
    values = {
        row.category: math.nan if row.image_auroc is None or pd.isna(row.image_auroc) else float(row.image_auroc)
        for row in table.itertuples()
    }
    figure = metric_bar_figure(values, title="Image AUROC per category (fused, test set)", ylabel="image AUROC")
    return table, figure


def report_fleet_configuration_error(message: str) -> pd.DataFrame:
    """Stand-in for the fleet when its categories cannot be resolved: fails the run, clearly."""
    raise ValueError(f"fleet pipeline unavailable: {message}")
