"""The one error type for problems with what the user gave (paths, data, checkpoints, flags)."""


class UserInputError(ValueError):
    """Bad input from the user: a missing or empty data path, a corpus too short for the batch and
    bptt, a truncated or foreign checkpoint, an architecture that does not match, an unknown preset.

    The message is one line that names the input and says what was expected; the ``sharnn``
    command prints it without a traceback and exits with status 2.
    """
