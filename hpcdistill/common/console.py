"""One-line notes for the user on stderr, from rank 0 only (every rank would print the same)."""

from __future__ import annotations

import sys

from hpcdistill.common.ranks import is_rank_zero


def say(message: str) -> None:
    if is_rank_zero():
        print(f"hpcdistill: {message}", file=sys.stderr, flush=True)
