"""The one error type the merge library raises for bad input."""


class ScfError(ValueError):
    """Bad input or an impossible request. The message names the file, tensor or config key.

    The CLI prints the message (no traceback) and exits with code 2.
    """
