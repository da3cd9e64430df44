"""One module per `compose` subcommand; each exposes ``register(subparsers)``."""
