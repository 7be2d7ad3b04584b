"""``evaluation``: predictions + maps → metrics.json, ROC/PR curves, histograms, heat-map overlays, report.html."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
