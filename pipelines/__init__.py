"""The `v05` command line, configs, experiments, demo and reports."""
