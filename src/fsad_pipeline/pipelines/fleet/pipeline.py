"""The ``dfd`` chain namespaced once per category, with shared inputs built once.

Kedro builds pipelines before it loads parameters into a catalog, so the category list is read
here from configuration: from the running session's config loader when there is one (kept by
``fsad_pipeline.hooks.FleetHooks``, so ``--env`` and ``--params fleet.categories=[...]`` apply), else
from ``conf/`` of the project in the working directory (``KEDRO_ENV`` picks the environment), as
for ``kedro registry list`` or ``kedro viz``.
"""

from __future__ import annotations

import logging
import os
import warnings
from functools import partial, update_wrapper
from pathlib import Path
from typing import Any

from kedro.pipeline import Pipeline, node, pipeline

from fsad_pipeline.data.fleet import fleet_plan
from fsad_pipeline.pipelines.dfd import create_pipeline as create_dfd_pipeline

from .nodes import gather_fleet_metrics, report_fleet_configuration_error

logger = logging.getLogger(__name__)

#: The one parameter each category gets its own copy of (every other parameter is shared).
CATEGORY_PARAMETER = "data"
#: The per-category output gathered into the fleet table.
METRICS_DATASET = "metrics"


def project_parameters() -> dict[str, Any]:
    """The parameters the fleet is built from (see the module docstring)."""
    from fsad_pipeline.hooks import active_parameters

    parameters = active_parameters()
    if parameters is not None:
        return parameters
    from kedro.framework.project import settings
    from kedro.utils import find_kedro_project

    project = find_kedro_project(Path.cwd()) or Path.cwd()
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=str(project / settings.CONF_SOURCE),
        env=os.environ.get("KEDRO_ENV"),
        **settings.CONFIG_LOADER_ARGS,
    )
    return loader["parameters"]


def _is_category_parameter(name: str) -> bool:
    bare = name.removeprefix("params:")
    return bare == CATEGORY_PARAMETER or bare.startswith(f"{CATEGORY_PARAMETER}.")


def build_fleet_pipeline(categories: list[str]) -> Pipeline:
    """``shared`` nodes once, the rest of ``dfd`` once per category, then the fleet table.

    Shared: the ``dfd`` nodes that do not depend on ``params:data`` (the texture bank), whose
    outputs every category reads un-namespaced. Per category: ``namespace=<category>`` renames its
    datasets to ``<category>.<name>`` (catalog factories ``{category}.<name>`` give the files) and
    its ``params:data`` to ``params:<category>.data``; every other parameter stays global.
    """
    dfd = create_dfd_pipeline()
    per_category = dfd.from_inputs(*[p for p in dfd.inputs() if _is_category_parameter(p)])
    shared = dfd - per_category
    shared_outputs = shared.all_outputs() & per_category.inputs()
    global_parameters = {
        p.removeprefix("params:") for p in per_category.inputs() if p.startswith("params:") and not _is_category_parameter(p)
    }
    chains = [
        pipeline(per_category, namespace=category, inputs=shared_outputs, parameters=global_parameters)
        for category in categories
    ]
    with warnings.catch_warnings():
        # It reads every namespace's metrics on purpose; Kedro warns about dotted names outside one.
        warnings.filterwarnings("ignore", message="One or more dataset names contain")
        gather = node(
            gather_fleet_metrics,
            inputs={category: f"{category}.{METRICS_DATASET}" for category in categories},
            outputs=["fleet_metrics", "fleet_metrics_figure"],
            name="gather_fleet_metrics",
        )
    return Pipeline([shared, *chains, gather], tags="fleet")


def create_pipeline(**kwargs) -> Pipeline:
    try:
        categories = list(fleet_plan(project_parameters()))
    except Exception as error:  # noqa: BLE001 - other pipelines must still load; the fleet run fails clearly
        logger.debug("fleet categories unavailable: %s", error)
        return Pipeline(
            [node(update_wrapper(partial(report_fleet_configuration_error, str(error)), report_fleet_configuration_error),
                  inputs=None, outputs="fleet_metrics", name="fleet_configuration_error")],
            tags="fleet",
        )
    return build_fleet_pipeline(categories)
