"""Pieces shared by the commands: choices read from a registry, option checks, and the error convention.

Error convention (every `v05` command): an error is one message that names the file / option / field and
the fix. Bad input (a recipe's `ValueError`, `FileNotFoundError`, `FileExistsError`, `KeyError`,
`PermissionError`, `OverflowError`, `ConfigError`, `OptionError`) exits with code 2, like click's own
usage errors; a `RuntimeError` a recipe raises on purpose (a missing extra, a failed sub-run) exits 1
with its message; anything else is unexpected and exits 1 with a one-line message that says to rerun
with `--debug`. The traceback is printed only with `v05 --debug ...` or `V05_DEBUG=1`.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Iterable

import click

from pipelines.common import OptionError

DEBUG_ENV = "V05_DEBUG"
DEBUG_HINT = f"rerun with --debug (or {DEBUG_ENV}=1) for the traceback"


class RegistryChoice(click.Choice):
    """A `click.Choice` whose names come from a registry, read when first needed.

    The registries live in modules that import torch; reading them lazily keeps `v05 --help` (which
    imports every command module for its one-line help) as light as before.
    """

    def __init__(self, names: Callable[[], Iterable[str]], case_sensitive: bool = True):
        self.names = names
        self.case_sensitive = case_sensitive
        self.cached: tuple[str, ...] | None = None

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.cached is None:
            self.cached = tuple(self.names())
        return self.cached


class InputError(click.ClickException):
    """Bad input that is no single option's fault (a file, a field, a store): exit code 2."""

    exit_code = 2


class UnexpectedError(click.ClickException):
    """An error the code did not anticipate: exit code 1, one line, and the hint to rerun with --debug."""

    exit_code = 1


# What a recipe raises for bad input (files, options, configs): exit code 2.
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, KeyError, PermissionError, IsADirectoryError, NotADirectoryError,
    OverflowError,
)
# What a command catches from its recipe and turns into one message (`fail`); anything else reaches the
# top-level group (`pipelines.cli.main`), which applies the same convention.
RECIPE_ERRORS = (*INPUT_ERRORS, RuntimeError)


def debug_enabled() -> bool:
    """True with `v05 --debug ...` (recorded in the click context) or `V05_DEBUG=1` in the environment."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get("v05.debug"))


def message_of(exc: BaseException) -> str:
    """The one-line-or-more text of an exception: a KeyError without its quotes, an OSError with its file."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in str(exc):
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, PermissionError):
        return f"{exc.filename}: permission denied; make it writable (or readable) for this user, or choose another path"
    return str(exc) or type(exc).__name__


def fail(exc: BaseException) -> click.ClickException:
    """The click error for a recipe's exception (see the module docstring for the exit codes).

    A bad option names its flag (`OptionError` -> `click.BadParameter`). With --debug the traceback of
    `exc` is printed to stderr first (the commands raise the result `from None`).
    """
    if debug_enabled() and exc.__traceback__ is not None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, OptionError):
        return click.BadParameter(str(exc), param_hint=exc.option)
    if isinstance(exc, INPUT_ERRORS):
        return InputError(message_of(exc))
    if isinstance(exc, RuntimeError):
        return UnexpectedError(f"{message_of(exc)} ({DEBUG_HINT})")
    first = (str(exc).strip().splitlines() or [""])[0]
    return UnexpectedError(f"unexpected {type(exc).__name__}{': ' + first if first else ''} ({DEBUG_HINT})")


def check_device_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback of --device: refuse a device this machine lacks (cuda without a GPU) before any work."""
    if value is None or value == "cpu":
        return value
    from pipelines.rl_train import check_device

    try:
        check_device(value)
    except OptionError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


# click types for counts: a negative number is refused by click itself (exit 2, naming the option)
COUNT = click.IntRange(min=0)
POSITIVE = click.IntRange(min=1)
