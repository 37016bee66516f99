"""The one error type for bad input from the user (flags, files, data, models).

Every command line catches it and prints one `error: ...` line with exit status 2."""


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""

    def __init__(self, message):
        # One line, whatever was interpolated into the message.
        super().__init__(" ".join(str(message).split()))
