"""Pieces shared by the commands: choices read from a registry, and recipe errors as click errors."""

from __future__ import annotations

from typing import Callable, Iterable

import click

from pipelines.common import OptionError


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


def fail(exc: Exception) -> click.ClickException:
    """The click error for a recipe's exception: a bad option names its flag, anything else its message."""
    if isinstance(exc, OptionError):
        return click.BadParameter(str(exc), param_hint=exc.option)
    return click.ClickException(str(exc))


# What a recipe raises for bad input (files, options, configs); anything else is a bug and keeps its traceback.
RECIPE_ERRORS = (FileExistsError, FileNotFoundError, ValueError, RuntimeError, KeyError)
