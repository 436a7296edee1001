"""The one generation interface every backend implements, and what they share: the model-directory
check (weights, tokenizer, pickles), the checked tokenizer load and the remote-code warning."""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.errors import EvalError
from evals.spec import FinishReason, GenParams

log = logging.getLogger("evals")

# Any one of these next to config.json makes a directory's tokenizer loadable with AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
SAFETENSORS_GLOB = "*.safetensors"
# Weights stored with pickle (torch.save): loading them can run arbitrary code.
PICKLE_GLOBS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
# A text any usable tokenizer turns into tokens (one with no vocabulary gives none).
TOKENIZER_PROBE = "Hello, world 123"


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

    @property
    def engine_settings(self) -> dict[str, Any]:
        """The settings the model was loaded and is driven with, as recorded in `EvalReport.engine`."""
        return {}

    def lm_eval_model(self, gen: GenParams):
        """lm-eval's model interface served by this already-loaded model (no second load).

        Args:
            gen: decoding settings of the run.

        Returns:
            An `lm_eval.api.model.LM`.

        Raises:
            EvalError: this backend cannot serve lm-eval's tasks.
        """
        raise EvalError(f"backend {self.name!r} cannot run lm-eval tasks")

    def close(self) -> None:  # noqa: B027 (a backend with nothing to release keeps this no-op)
        """Release the model and its (GPU) memory; the backend cannot generate afterwards."""


def check_model_dir(model: str | Path, *, allow_pickle: bool = False) -> Path:
    """Check that `model` is a local model directory with a config, a tokenizer and safe weights.

    Args:
        model: path of a directory written by `save_pretrained` (or a merge).
        allow_pickle: accept pickled weights (`pytorch_model.bin`, ...) when there are no
            safetensors; without it they are refused, since unpickling can run code.

    Returns:
        The directory as an absolute Path.

    Raises:
        EvalError: naming the directory and what is wrong with it.
    """
    path = Path(model).expanduser()
    if path.is_file():
        raise EvalError(f"{path} is a file, not a model directory (give the directory that holds "
                        "config.json, the tokenizer and the weights)")
    if not path.exists():
        raise EvalError(f"model directory not found: {path}")
    if not path.is_dir():
        raise EvalError(f"{path} is not a model directory (not a directory at all)")
    if not (path / "config.json").is_file():
        raise EvalError(f"model directory {path} has no config.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise EvalError(f"model directory {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    if not any(path.glob(SAFETENSORS_GLOB)):
        pickled = sorted(p.name for pattern in PICKLE_GLOBS for p in path.glob(pattern))
        if not pickled:
            raise EvalError(f"model directory {path} has no weights (no {SAFETENSORS_GLOB} file)")
        if not allow_pickle:
            raise EvalError(
                f"model directory {path} has only pickled weights ({pickled[0]}), which can run code "
                "when loaded; convert them to safetensors, or pass --allow-pickle (allow_pickle: true "
                "in the eval config) if you trust them"
            )
    return path.resolve()


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False):
    """The model's tokenizer (`AutoTokenizer`), checked to be usable.

    Args:
        model_dir: a checked model directory.
        trust_remote_code: allow the tokenizer's own Python code (see `warn_remote_code`).

    Returns:
        The tokenizer.

    Raises:
        EvalError: the tokenizer files cannot be loaded, or give a tokenizer that turns text into
            no tokens (e.g. a tokenizer_config.json with no vocabulary).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types (JSON, OSError, AttributeError, ...)
        problem = f"its tokenizer cannot be loaded ({one_line(err)})"
        raise EvalError(f"model directory {model_dir}: {problem}") from err
    if not tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]:
        raise EvalError(
            f"model directory {model_dir}: its tokenizer ({type(tokenizer).__name__}) turns text into no "
            "tokens; it is not a usable tokenizer (a tokenizer_config.json without a vocabulary?)"
        )
    return tokenizer


def warn_remote_code(model_dir: Path, trust_remote_code: bool) -> None:
    """Log a warning line when a model is loaded with its own code allowed to run.

    Args:
        model_dir: the model being loaded.
        trust_remote_code: the setting it is loaded with.
    """
    if trust_remote_code:
        log.warning(
            "trust_remote_code is on: Python code shipped with %s may run with your permissions", model_dir
        )


def eos_ids_from(*sources) -> list[int]:
    """The distinct EOS token ids named by several sources, in order.

    Args:
        *sources: each an id, a list of ids or None (generation config, model config, tokenizer).

    Returns:
        The ids, first mention first.
    """
    ids: list[int] = []
    for source in sources:
        for token in source if isinstance(source, list) else [source]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and its message with whitespace collapsed.

    Args:
        err: the exception.
        limit: the most characters of message kept.

    Returns:
        "Type: message".
    """
    message = re.sub(r"\s+", " ", str(err)).strip()
    if len(message) > limit:
        message = message[:limit] + "..."
    return f"{type(err).__name__}: {message}"
