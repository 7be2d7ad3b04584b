"""Kedro project settings (defaults, plus the environments live under conf/)."""

from fsad_pipeline.hooks import FleetHooks

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}

#: FleetHooks: the fleet pipeline is built from the run's parameters (see hooks.py).
HOOKS = (FleetHooks(),)
