"""Small apps that tests/test_cli.py serves with ``python -m passrpc``."""
