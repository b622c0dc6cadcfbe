"""The ``kafka-saga`` command line (``python -m saga.cli``): worker, demo and administration."""

from saga.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
