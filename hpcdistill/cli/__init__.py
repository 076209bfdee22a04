"""The `hpcdistill` command: one module per group of subcommands, each a thin call into the stage it runs."""

from hpcdistill.common.lazy_exports import lazy_exports

_EXPORTS = {"main": "main", "build_parser": "main"}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
