"""``evaluation``: predictions + maps → metrics.json, ROC curve, histograms, heat-map overlays."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
