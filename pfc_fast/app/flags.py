"""Command-line value types of the ``pfc-fast`` commands and the experiments, and
:class:`UsageError`, a bad value reported against its flag (``parser.error``: exit status 2)."""
import argparse
import math


#: Seeds are 32-bit: the data order and augmentation streams are drawn from them.
SEED_LIMIT = 2**32


class UsageError(Exception):
    """A bad command-line value: ``argument`` names the flag (e.g. ``"--data-dir"``)."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"argument {argument}: {message}")
        self.argument, self.message = argument, message


def positive_int(text: str) -> int:
    """``int(text)``, which must be >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """``int(text)``, which must be >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def seed(text: str) -> int:
    """``int(text)``, which must be in ``[0, 2**32)``."""
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**32 - 1, got {text}")
    return value


def seconds(text: str) -> float:
    """``float(text)``, a duration from 1 second to a week."""
    value = float(text)
    if not 1 <= value <= 7 * 86400:
        raise argparse.ArgumentTypeError(f"must be a number of seconds from 1 to 604800 (a week), got {text}")
    return value


def positive_float(text: str) -> float:
    """``float(text)``, which must be finite and > 0."""
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """``float(text)``, which must be finite and >= 0."""
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value
