"""The one error type the CLI turns into a single line and a non-zero exit (never a traceback)."""


class EdgefleetError(Exception):
    """A problem with the user's input or environment; the message names it."""

    exit_code = 2
