"""The one error type for problems with what the user gave (paths, data, checkpoints, flags)."""


class UserInputError(ValueError):
    """Bad input from the user: a missing or empty data path, a corpus too short for the batch and
    bptt, a truncated or foreign checkpoint, an architecture that does not match, an unknown preset.

    The message is one line that names the input and says what was expected; the ``sharnn``
    command prints it without a traceback and exits with status 2.
    """


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command before it finished. ``signum`` is the signal (the
    ``sharnn`` command exits with 128 + signum: 130 for SIGINT, 143 for SIGTERM) and ``detail``
    one line for the user (e.g. which step the last checkpoint holds and how to resume)."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(detail)
        self.signum, self.detail = int(signum), detail


class StorageError(RuntimeError):
    """The run could not write its files (a full disk, say). One line naming the file, the reason
    and the last checkpoint that is intact; the ``sharnn`` command exits with status 1."""
