"""The command line's flags, one module per command family, without the library: each command names its
handler as ``"module:function"`` (``set_defaults(handler=...)``), which ``igpt.cli.main`` imports only after
parsing. Only ``igpt.cli.args`` and ``igpt.config`` are imported here, so ``--help`` never waits for torch."""
