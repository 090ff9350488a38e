"""The `v05` command line.

Commands live in their own modules and are imported only when invoked, so `v05 sql` or `v05 --help`
never pays for importing torch or transformers. Add a command by adding one line to `_COMMANDS`.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

# name -> "module:attribute" of a click command or group.
_COMMANDS: dict[str, str] = {
    "demo": "pipelines.demo:demo",
    "bench": "pipelines.cli:bench",
    "data": "pipelines.cli_data:data",
    "sql": "pipelines.cli_data:sql",
    "build-data": "pipelines.cli_rl:build_data",
    "rl-train": "pipelines.cli_rl:rl_train",
    "evaluate": "pipelines.cli_rl:evaluate",
    "pretrain-v0": "pipelines.cli_v0:pretrain_v0",
    "predict-v0": "pipelines.cli_v0:predict_v0",
    "experiment": "pipelines.experiment:experiment",
    "report": "pipelines.report:report",
}

_BENCH_COMMANDS: dict[str, str] = {
    "estimator": "pipelines.bench_estimator:estimator",
    "store": "pipelines.bench_store:store",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._available()))

    def _available(self) -> list[str]:
        names = []
        for name, target in self._lazy.items():
            module = target.split(":")[0]
            if importlib.util.find_spec(module) is not None:
                names.append(name)
        return names

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self._lazy:
            module_name, attr = self._lazy[name].split(":")
            if importlib.util.find_spec(module_name) is None:
                return None
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, name)


@click.group(
    cls=LazyGroup,
    lazy=_COMMANDS,
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


@click.group(cls=LazyGroup, lazy=_BENCH_COMMANDS)
def bench() -> None:
    """Benchmarks measured as ratios against a baseline in the same run."""


if __name__ == "__main__":
    main()
