"""The exceptions the CLI turns into one line on stderr: UserError (exit code 2) and TrainingFailed (exit code 1)."""


class UserError(Exception):
    """A problem in the user's input (options, files, data), with the fix in the message."""


class TrainingFailed(Exception):
    """Training stopped for a reason the input did not show in advance (the loss became NaN or infinite).
    The CLI prints it as one line, like a UserError, but exits with code 1: the settings were valid."""


class Interrupted(Exception):
    """Training stopped on SIGTERM or Ctrl-C after writing a complete checkpoint. The CLI prints the message
    (which names the checkpoint and the command that resumes the run) and exits with 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
