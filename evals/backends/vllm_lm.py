"""lm-eval's model interface served by our `VLLMBackend`: lm-eval's tasks run on the engine that is
already loaded, so one evaluation uses one vLLM engine.

- `generate_until`: the engine's `generate_ids` with the run's `GenParams`; from each request only
  its stop sequences (`until`) and `max_gen_toks` are taken (as the "hf" path does, our decoding
  settings replace the task's).
- `loglikelihood` / `loglikelihood_rolling`: vLLM's prompt log-probabilities of context +
  continuation in one forward pass (`VLLMBackend.prompt_logprobs`), summed over the continuation;
  `is_greedy` says whether each continuation token was the most likely one.

Tokenization follows lm-eval's "hf" model (`TemplateLM`): a context that already starts with BOS
(a chat template's) gets no second one, and a context too long for `max_model_len` is cut on the
left.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from evals.spec import GenParams

if TYPE_CHECKING:
    from evals.backends.vllm import VLLMBackend


class VLLMBackendLM(TemplateLM):
    """An lm-eval `LM` on a loaded `VLLMBackend`.

    Args:
        backend: the loaded backend (its engine, tokenizer and settings).
        gen: decoding settings of the run.
    """

    def __init__(self, backend: VLLMBackend, gen: GenParams) -> None:
        super().__init__()
        self.backend = backend
        self.gen = gen
        self.tokenizer = backend.tokenizer

    @property
    def eot_token_id(self) -> int:
        """The tokenizer's EOS id (lm-eval's end of text)."""
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS, else EOS (as lm-eval's models)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        """The engine's longest sequence, prompt plus generation."""
        return self.backend.max_model_len

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer in lm-eval's request-cache keys."""
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The chat as the model's template renders it (lm-eval calls this with `apply_chat_template`).

        Args:
            chat_history: lm-eval's messages.
            add_generation_prompt: end with the assistant's turn opening.

        Returns:
            The rendered text.
        """
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of a string; with `add_special_tokens=None`, no second BOS before a BOS.

        Args:
            string: the text.
            add_special_tokens: None = the tokenizer's default, unless the text starts with BOS.

        Returns:
            The ids.
        """
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **special)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for each request until one of its stop sequences or `max_gen_toks` tokens.

        Args:
            requests: lm-eval Instances with args (context, gen_kwargs).
            disable_tqdm: hide the progress bar.

        Returns:
            One text per request, cut before the first stop sequence.
        """
        eos = self.tokenizer.decode(self.eot_token_id)
        groups: dict[tuple, list[int]] = defaultdict(list)  # one engine call per (until, max tokens)
        for index, request in enumerate(requests):
            _, gen_kwargs = request.args
            until = gen_kwargs.get("until")
            until = handle_stop_sequences(list(until) if isinstance(until, list) else until, eos=eos)
            max_gen_toks = int(gen_kwargs.get("max_gen_toks", self.gen.max_new_tokens))
            groups[(tuple(until), max_gen_toks)].append(index)
        texts: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until (vllm)", disable=disable_tqdm)
        for (until, max_gen_toks), indices in groups.items():
            params = self.gen.model_copy(update={"stop": until, "max_new_tokens": max_gen_toks})
            room = max(self.max_length - max_gen_toks, 1)  # left-truncate contexts to fit
            prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in indices]
            for i, generation in zip(indices, self.backend.generate_ids(prompts, params), strict=True):
                texts[i] = postprocess_generated_text(generation.text, list(until), None)
                self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
            bar.update(len(indices))
        bar.close()
        return texts

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """Sum of the continuation's log-probabilities, and whether it was the greedy choice.

        Args:
            requests: ((context, continuation) or None, context ids, continuation ids) triples.
            disable_tqdm: unused (one batched engine call).

        Returns:
            (logprob, is_greedy) per request.
        """
        keep = self.max_length - 1  # vLLM generates at least one token after the prompt
        inputs, starts = [], []
        for _, context, continuation in requests:
            tokens = (list(context) + list(continuation))[-keep:]
            inputs.append(tokens)
            starts.append(max(len(tokens) - len(continuation), 1))  # position 0 has no logprob
        results = []
        positions_of = self.backend.prompt_logprobs(inputs)
        for (key, _, _), tokens, start, positions in zip(requests, inputs, starts, positions_of, strict=True):
            total, greedy = 0.0, True
            for token, logprobs in zip(tokens[start:], positions[start:], strict=True):
                total += logprobs[token]
                greedy = greedy and max(logprobs, key=logprobs.get) == token
            results.append((total, greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, results[-1])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of at most `max_length` tokens (perplexity tasks).

        Args:
            requests: lm-eval Instances with args (text,).
            disable_tqdm: unused.

        Returns:
            One summed log-probability per text.
        """
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            rolling = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 2,  # room for the context token and vLLM's one token
                context_len=1,
            )
            for window in map(make_disjoint_window, rolling):
                windows.append((None, *window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals
