"""`UsageError`: shared by the command line and the demo (neither imports the other for it)."""


class UsageError(ValueError):
    """A command-line argument is wrong (file missing, value out of range, ...)."""
