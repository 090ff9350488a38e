"""The `v05` command line.

Every command lives in a module of this package and only parses options, then calls a recipe of
`pipelines` (`rl_train`, `build_data`, `pretrain_v0`, ...). Commands are imported only when invoked, so
`v05 sql` or `v05 --help` never pays for importing torch or transformers: `COMMANDS` below is the one
place where project modules are named as strings. Add a command by adding one line to it.

Errors (`pipelines.cli.options` has the convention): every error is one message naming the file /
option / field and the fix; bad input exits 2, anything unexpected exits 1 with a one-line message; the
traceback only with the global `--debug` flag or `V05_DEBUG=1`. Commands turn their recipe's errors into
messages with `options.fail`; `V05Group.invoke` applies the same rule to whatever escapes a command, and
prints warnings (a skipped checkpoint, a deprecated key) as one `warning: ...` line each.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import click

from pipelines.cli.options import DEBUG_ENV, debug_enabled, fail

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
    "gradient": "pipelines.bench.gradient:gradient",
    "prior": "pipelines.bench.prior:prior_command",
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


class V05Group(LazyGroup):
    """The top-level group: lazy commands, and the error convention for anything a command lets escape."""

    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings():
            if not debug_enabled():
                warnings.showwarning = show_warning
            try:
                return super().invoke(ctx)
            except (click.ClickException, click.exceptions.Exit, click.Abort):
                raise
            except Exception as exc:  # noqa: BLE001 - the one place that turns any error into a message
                if debug_enabled():
                    raise
                raise fail(exc) from None


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for the command line: one `warning: ...` line on stderr, no source location."""
    click.echo(f"warning: {message}", err=True)


def set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta["v05.debug"] = True


@click.group(
    cls=V05Group,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(package_name="v05")
@click.option("--debug", is_flag=True, is_eager=True, expose_value=False, callback=set_debug,
              help=f"Print the traceback of an error (also: {DEBUG_ENV}=1).")
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
