"""Project hooks: the parameters the ``fleet`` pipeline needs before and after Kedro builds it.

Kedro builds pipelines (``register_pipelines``) before it creates the catalog, so the fleet's
``create_pipeline`` cannot read parameters from a catalog. The session does create the context
(and fires ``after_context_created``) just before it builds the requested pipelines, so
:class:`FleetHooks` keeps that context's config loader: the fleet is then built from the same
parameters as the run, ``--env`` and ``--params`` included. After the catalog exists, the hook adds
each category's namespaced ``params:<category>.data`` (see ``fsad_pipeline.data.fleet``).
"""

from __future__ import annotations

import logging
from typing import Any

from kedro.framework.hooks import hook_impl

from fsad_pipeline.data.fleet import fleet_plan

logger = logging.getLogger(__name__)

_active_config_loader: Any = None


def active_parameters() -> dict[str, Any] | None:
    """The parameters of the context the running session created (``None`` outside a session)."""
    if _active_config_loader is None:
        return None
    return _active_config_loader["parameters"]


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``params:<prefix>`` and, like Kedro does for nested parameters, every ``params:<prefix>.<key>``."""
    entries = {f"params:{prefix}": value}
    if isinstance(value, dict):
        for key, item in value.items():
            entries.update(_flatten(f"{prefix}.{key}", item))
    return entries


class FleetHooks:
    """Hand the run's parameters to the fleet pipeline and give each category its ``data``."""

    @hook_impl
    def after_context_created(self, context) -> None:
        global _active_config_loader
        _active_config_loader = context.config_loader

    @hook_impl
    def after_catalog_created(self, catalog, parameters: dict[str, Any]) -> None:
        # Kedro passes the catalog's parameter entries: the whole dictionary is under "parameters".
        try:
            plan = fleet_plan(parameters["parameters"])
        except Exception as error:  # noqa: BLE001 - only the fleet needs this; other runs go on
            logger.debug("no fleet parameters added to the catalog: %s", error)
            return
        for category, data in plan.items():
            for name, value in _flatten(f"{category}.data", data).items():
                catalog[name] = value
