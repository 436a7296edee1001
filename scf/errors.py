"""The one error type the merge library raises for bad input, and the helpers that keep its message short."""

from __future__ import annotations

import re
from typing import Any

# The CLI prints an error as one line; a message longer than this is cut (a path or a tensor name is
# never this long, an unbounded value quoted by mistake is).
MAX_MESSAGE_CHARS = 2000
_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colours some libraries put in their messages


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` on one line (line breaks and the indentation after them become ``"; "``, terminal
    colour codes are dropped), at most ``limit`` characters.

    Args:
        text: any message, e.g. an exception's ``str()``.
        limit: the longest result; longer text is cut and ends with how much was left out.

    Returns:
        The single-line text.
    """
    flat = _LINE_BREAKS.sub("; ", _TERMINAL_CODES.sub("", text).strip())
    if len(flat) <= limit:
        return flat
    return f"{flat[: limit - 40]}... ({len(flat) - limit + 40} more characters)"


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, for quoting user input in a message.

    Containers are summarised before ``repr`` runs, so a huge (or alias-shared) list never gets
    expanded into a string.

    Args:
        value: what the user gave.
        limit: the longest result.

    Returns:
        The (possibly shortened) repr.
    """
    if isinstance(value, list | tuple | dict | set) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    if isinstance(value, list | tuple) and any(isinstance(v, list | tuple | dict) for v in value):
        return f"<{type(value).__name__} of {len(value)} nested items>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ScfError(ValueError):
    """Bad input or an impossible request. The message names the file, tensor or config key.

    The message is always one line of bounded length (see `one_line`): the CLI prints it as
    ``error: <message>`` (no traceback) and exits with code 2.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(str(message)))
