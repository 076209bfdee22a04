"""The `hpcdistill` command: one module per group of subcommands, each a thin call into the stage it runs. The
command's entry point is `hpcdistill.cli.main:main`, a module and its function; nothing is re-exported here, so
`hpcdistill.cli.main` is always the module. The command's entry point is
`hpcdistill.cli.main:main` (a module and its function; nothing is re-exported here)."""

__all__: list[str] = []
