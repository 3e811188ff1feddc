"""The command line's own error: a mistake in how a command was called."""


class UsageError(Exception):
    """A mistake in how the command was called; the message names the problem and the fix."""
