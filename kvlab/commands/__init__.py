"""``kvlab`` subcommands beyond ``methods`` and ``ppl``: one module each, with ``register(subparsers)``."""
