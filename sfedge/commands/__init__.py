"""One module per CLI verb: ``register(subparsers, verb, help) -> parser`` and ``run(args) -> int``."""
