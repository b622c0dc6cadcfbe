"""Processes of the end-to-end tests, each run as ``python -m tests.e2e.apps.<name>``."""
