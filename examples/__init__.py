"""Runnable examples of passrpc: ``python examples/hello.py`` or ``python -m examples.hello``."""
