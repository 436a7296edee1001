"""The toy zoo's tokenizer: character level, built with the `tokenizers` library.

Every printable ASCII character and newline is one token, after the specials ``<pad>``, ``<s>``,
``</s>``, ``<unk>`` (ids 0-3). Character level keeps
arithmetic and string tasks learnable by tiny models. Nothing is added automatically when encoding
(no post-processor): the chat template writes the BOS, so ``tokenizer(text)`` and
``apply_chat_template(..., tokenize=True)`` give the same ids for the same text.

Example:
    >>> tok = build_tokenizer()
    >>> tok.decode(tok("12+3")["input_ids"])
    '12+3'
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from evals.toytasks import BOS, CHAT_TEMPLATE, EOS, PAD, UNK

SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
CHARACTERS = ("\n", *(chr(code) for code in range(32, 127)))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the zoo tokenizer (deterministic: the vocabulary is fixed).

    Returns:
        A fast tokenizer with BOS/EOS/PAD/UNK, left padding (for batched generation) and the zoo's
        chat template; ``save_pretrained`` it next to a model and load it with ``AutoTokenizer``.
    """
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character (newline included) is its own pre-token, hence its own token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters back without separators
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
