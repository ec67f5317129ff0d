"""Errors that are the user's to fix: the CLI prints them as one line, never a stack trace."""


class BreastvisionError(Exception):
    """A problem with the user's input, data or files, explained in its message."""


class DatasetNotFoundError(BreastvisionError):
    """A dataset is not where it was looked for."""
