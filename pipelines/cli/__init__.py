"""The `v05` command line.

Every command lives in a module of this package and only parses options, then calls a recipe of
`pipelines` (`rl_train`, `build_data`, `pretrain_v0`, ...). Commands are imported only when invoked, so
`v05 sql` or `v05 --help` never pays for importing torch or transformers: `COMMANDS` below is the one
place where project modules are named as strings. Add a command by adding one line to it.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

# name -> "module:attribute" of a click command or group.
COMMANDS: dict[str, str] = {
    "demo": "pipelines.cli.demo:demo",
    "bench": "pipelines.cli:bench",
    "data": "pipelines.cli.data:data",
    "sql": "pipelines.cli.data:sql",
    "build-data": "pipelines.cli.rl:build_data",
    "rl-train": "pipelines.cli.rl:rl_train",
    "evaluate": "pipelines.cli.rl:evaluate",
    "pretrain-v0": "pipelines.cli.v0:pretrain_v0",
    "predict-v0": "pipelines.cli.v0:predict_v0",
    "experiment": "pipelines.cli.experiment:experiment",
    "report": "pipelines.cli.report:report",
}

BENCH_COMMANDS: dict[str, str] = {
    "estimator": "pipelines.cli.benchmarks:estimator",
    "store": "pipelines.cli.benchmarks:store",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.available()))

    def available(self) -> list[str]:
        """Names of the lazy commands whose module can be found."""
        return [name for name, target in self.lazy.items() if importlib.util.find_spec(target.split(":")[0])]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module_name, attr = self.lazy[name].split(":")
            if importlib.util.find_spec(module_name) is None:
                return None
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, name)


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(package_name="v05")
def main() -> None:
    """V0.5: a generalist value model as a prior for sparse RL rollouts.

    \b
    stage 1  build-data    GRPO runs over a policy family -> every rollout into a trajectory store
             pretrain-v0   train the V0 value model on the store's (prompt, success) pairs
    stage 2  rl-train      V0.5 RL with the frozen V0 prior (embedded CPU engine or verl)
             sql           inspect any store with read-only DuckDB SQL
    """


@click.group(cls=LazyGroup, lazy=BENCH_COMMANDS)
def bench() -> None:
    """Benchmarks measured as ratios against a baseline in the same run."""
