"""The two kinds of failure every command distinguishes (exit 2 and exit 1)."""


class BadInputError(Exception):
    """Something the user gave is wrong: the command prints one line and exits 2."""

    exit_code = 2


class RunFailedError(Exception):
    """The work itself failed (not the input): the command prints one line and exits 1."""

    exit_code = 1
