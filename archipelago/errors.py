"""Errors of the command line itself (kept apart from `cli` so `python -m archipelago.cli`
and the installed command raise and catch the very same class)."""


class UsageError(Exception):
    """A command-line mistake: a missing file, a malformed option value, a refusal."""
