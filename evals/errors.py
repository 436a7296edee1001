"""The one error type the evaluation library raises for bad input."""


class EvalError(ValueError):
    """Bad input (missing model, unknown suite, malformed data file...). The message names the problem.

    The CLI prints the message (no traceback) and exits with code 2.
    """
