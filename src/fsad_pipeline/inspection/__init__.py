"""Inspecting new images with a promoted model bundle.

:mod:`.inspector` holds the one inspection function behind both the ``inference`` Kedro pipeline
and the ``fsad-inspect`` command (verdict, score, overlay, defect type). An HTTP inspection service
belongs here too, calling the same function.
"""
