"""The one exception type for mistakes a user can fix: the CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """A problem in the user's input (options, files, data), with the fix in the message."""
