"""The one exception type users see: its message is a single line naming the file or key and the reason."""

from __future__ import annotations


class HpcdistillError(Exception):
    """A user-facing error. `str(err)` is one line: '<file or key>: <reason>'."""
