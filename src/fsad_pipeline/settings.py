"""Kedro project settings (defaults, plus the environments live under conf/)."""

from fsad_pipeline.hooks import FleetHooks, NodeTimingHooks, TorchThreadsHooks

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}

#: FleetHooks: the fleet pipeline is built from the run's parameters (see hooks.py).
#: NodeTimingHooks: seconds and RSS per node -> data/08_reporting/node_timings.json (FSAD_NODE_TIMINGS=0: off).
#: TorchThreadsHooks: torch's CPU threads from the ``threads`` parameter (auto: affinity and cgroup quota).
HOOKS = (FleetHooks(), NodeTimingHooks(), TorchThreadsHooks())
