"""The one generation interface every backend implements, and the model-directory check they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evals.errors import EvalError
from evals.spec import FinishReason, GenParams

# Any one of these next to config.json makes a directory's tokenizer loadable with AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Generation:
    """One generated continuation.

    Attributes:
        text: the decoded continuation, special tokens stripped, cut before the first stop string.
        token_ids: the generated token ids (the prompt and EOS excluded; a stop string's tokens
            kept, since they were generated).
        finish_reason: "stop" (EOS or a stop string) or "length" (hit max_new_tokens).
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason


class Backend(ABC):
    """A loaded model that turns prompts into `Generation`s.

    Implementations take every decoding setting from `GenParams` (never a library default)
    and return exactly one `Generation` per prompt, in order.
    """

    name: str = "backend"

    @abstractmethod
    def generate(
        self, prompts: Sequence[str], params: GenParams, *, progress: bool = False
    ) -> list[Generation]:
        """Generate one continuation per prompt.

        Args:
            prompts: user messages (the chat template, when used, is applied by the backend).
            params: decoding settings.
            progress: show a progress bar.

        Returns:
            One `Generation` per prompt, in the same order.
        """

    def render(self, prompt: str) -> str:
        """The exact text the model sees for a user message (backends with chat templates override).

        Args:
            prompt: the user message.

        Returns:
            The rendered prompt; here, the message itself.
        """
        return prompt

    @property
    @abstractmethod
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a generation."""

    @property
    @abstractmethod
    def device(self) -> str:
        """Where the model runs ("cpu", "cuda", ...)."""


def check_model_dir(model: str | Path) -> Path:
    """Check that `model` is a local model directory with a config and a tokenizer.

    Args:
        model: path of a directory written by `save_pretrained` (or a merge).

    Returns:
        The directory as an absolute Path.

    Raises:
        EvalError: naming the directory and what is missing.
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        raise EvalError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise EvalError(f"model directory {path} has no config.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise EvalError(f"model directory {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return path.resolve()
