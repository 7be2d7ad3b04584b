"""Defect-type classification of the images flagged NG.

:mod:`.defect_types` fits the classifier and its two baselines in one fit and classifies images;
a model bundle carries the fitted classifier (see :mod:`fsad_pipeline.model_store.bundle`). The
Kedro stage over it is :mod:`fsad_pipeline.pipelines.classification`.
"""
