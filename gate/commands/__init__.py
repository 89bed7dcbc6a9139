"""Sub-commands of the ``gate`` CLI; each module has ``register(subparsers)``."""
