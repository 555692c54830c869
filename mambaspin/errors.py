"""Errors that users can fix: the CLI prints their message without a traceback."""


class UserError(ValueError):
    """Invalid user input (a path, a config value, a data file).

    The message names the value, what was expected and what to do next. The command-line entry
    point prints it and exits with status 2; library callers can catch it like any exception.
    """


class NotSupportedError(UserError):
    """A request that is valid but that mambaspin does not implement yet."""

    def __init__(self, what: str):
        super().__init__(f"not supported yet: {what}")
