"""The range of every numeric flag, in one table, applied to the parser once it is built: a value outside it is
refused at parse time in one line (exit 2) naming the flag, before anything is read, allocated or submitted.
`tests/unit/cli/test_flag_ranges.py` walks every subcommand and checks that no numeric flag is left unbounded."""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

from hpcdistill.common.limits import limit
from hpcdistill.slides.mag_scale import MPP_AT_10X_RANGE

SEED_MAX = 2**32 - 1
MINUTES_PER_YEAR = 366 * 24 * 60
# flag: (low, high); bounds are inclusive. The same flag means the same thing in every command that has it.
FLAG_RANGES: dict[str, tuple[float, float]] = {
    "--aux1": (0, 10_000),
    "--aux2": (0, 10_000),
    "--slides-per-split": (0, 10_000),
    "--classes": (2, 1000),  # synth: a class count (names are not numbers)
    "--size": (256, 262_144),
    "--tissues": (1, 64),
    "--signal": (0.0, 10.0),
    "--site": (0, 1000),
    "--mpp-at-10x": MPP_AT_10X_RANGE,
    "--seed": (0, SEED_MAX),
    "--seeds": (1, 100),
    "--workers": (0, 4096),  # capped at the cores this process may use, with a line (cli.main)
    "--mags": (0.01, 400.0),
    "--base-mag": (0.1, 400.0),
    "--max-size": (16, 65_536),
    "--min-side": (1, 65_536),
    "--jpeg-quality": (1, 100),
    "--shard-max-samples": (1, 10_000_000),
    "--split-ratios": (0.0, 1000.0),
    "--tasks": (1, 10_000),
    "--cpus-per-task": (1, 1024),
    "--gpus-per-node": (0, 64),
    "--mem-gb": (0.1, 65_536.0),
    "--timeout-min": (1, MINUTES_PER_YEAR),
    "--max-requeue": (0, 1000),
    "--iterations": (1, limit("bootstrap_iterations")),
    "--confidence": (1e-6, 1 - 1e-6),
    "--level": (1e-6, 1 - 1e-6),  # the old spelling of --confidence
    "--width": (1, 4096),
    "--num-classes": (2, 100_000),
    "--tissue-thumb-size": (64, 16_384),
    "--tissue-close-radius": (0, 256),
    "--tissue-open-radius": (0, 256),
    "--tissue-min-area-frac": (0.0, 1.0),
    "--tissue-pad-frac": (0.0, 1.0),
    "--tissue-min-contrast": (0.0, 255.0),
}


class Bounded:
    """An argparse type: what `convert` makes of the text, with every number in it (a number, a list's items, a
    mapping's values) within [low, high]."""

    def __init__(self, convert: Callable[[str], Any], flag: str, low: float, high: float) -> None:
        self.convert, self.flag, self.low, self.high = convert, flag, low, high
        self.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its messages

    def __eq__(self, other: object) -> bool:  # the same flag, converted and bounded the same way in two commands
        return isinstance(other, Bounded) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple:
        return (self.convert, self.flag, self.low, self.high)

    def __call__(self, text: str) -> Any:
        value = self.convert(text)
        for number in _numbers(value):
            if not (math.isfinite(number) and self.low <= number <= self.high):
                raise argparse.ArgumentTypeError(f"{text!r}: must be in [{self.low:g}, {self.high:g}]")
        return value


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool) or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [n for item in value for n in _numbers(item)]
    return []


def numeric(action: argparse.Action) -> bool:
    """Whether the flag takes a number (or numbers): its type is not str and it stores a value."""
    return action.option_strings != [] and action.type not in (None, str) and action.nargs != 0


def bound_flags(parser: argparse.ArgumentParser) -> None:
    """Wrap each numeric flag's type of every subcommand in its range from FLAG_RANGES."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for subparser in sub.choices.values():
        for action in subparser._actions:
            flag = next((f for f in action.option_strings if f in FLAG_RANGES), None)
            if numeric(action) and flag is not None and not isinstance(action.type, Bounded):
                action.type = Bounded(action.type, flag, *FLAG_RANGES[flag])
