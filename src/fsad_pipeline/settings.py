"""Kedro project settings (defaults, plus the environments live under conf/)."""

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
