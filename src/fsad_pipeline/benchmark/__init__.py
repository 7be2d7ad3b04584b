"""Benchmarks of the pipeline, run from the command line.

* ``python -m fsad_pipeline.benchmark``: the real ``dfd`` chain over several k and seeds, with time
  and memory (:mod:`.runs`); ``--micro-only`` the coreset / kNN micro-benchmarks (:mod:`.micro`);
  ``--fleet`` SequentialRunner vs DaskRunner (:mod:`.fleet`); ``--suite real`` every real dataset
  against the plain patch-kNN reference (:mod:`.suite`, :mod:`.reference`).
* ``python -m fsad_pipeline.benchmark.defect_types``: few-shot defect-type classification.
* ``python -m fsad_pipeline.benchmark.base_training``: base-trained vs plain backbone.

Only the light modules are imported here (no torch), so the command line starts fast and the
sub-modules can be run with ``-m`` without being imported twice.
"""

from fsad_pipeline.benchmark.fleet import FLEET_SMALL_PARAMS, FLEET_VARIANTS, fleet_benchmark, fleet_markdown, run_fleet_once
from fsad_pipeline.benchmark.micro import micro_benchmarks
from fsad_pipeline.benchmark.runs import PROJECT_ROOT, load_parameters, make_workdir, markdown_table, run_once, summarise

__all__ = [
    "FLEET_SMALL_PARAMS",
    "FLEET_VARIANTS",
    "PROJECT_ROOT",
    "fleet_benchmark",
    "fleet_markdown",
    "load_parameters",
    "make_workdir",
    "markdown_table",
    "micro_benchmarks",
    "run_fleet_once",
    "run_once",
    "summarise",
]
