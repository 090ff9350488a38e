"""Small pieces every recipe and the command line share: the option error and the torch thread count."""

from __future__ import annotations


class OptionError(ValueError):
    """Bad input that one command-line option controls; `option` names it (e.g. "--rename").

    Recipes raise it so that the CLI can point at the flag to change, while a recipe called from Python
    (the demo, a notebook) still gets an ordinary `ValueError`.
    """

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


def set_threads(threads: int | None) -> None:
    """`torch.set_num_threads(threads)` when given (torch is imported only then)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
