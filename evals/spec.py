"""What an evaluation run is asked to do (`EvalSpec`, `GenParams`) and what it reports (`EvalReport`).

Every generation setting is explicit and recorded with the results: nothing is left as
"None = whatever the library's default is" (a model's generation_config can otherwise change a
score silently, lm-eval issue #3154). All models are JSON-serialisable (`model_dump(mode="json")`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evals.catalog import get_suite

FinishReason = Literal["stop", "length"]

# The one home of the generation metrics' names, as MLflow, DuckDB (generation_stats columns) and the
# gate know them. Benchmark scores are named `<benchmark>.<metric>` beside them.
REPETITION_RATE = "repetition_rate"  # share of looping generations
MEAN_SEQ_REP_4 = "mean_seq_rep_4"
TRUNCATION_RATE = "truncation_rate"
# Names of the safety figures: report-level metrics (`EvalReport.metrics()`) and the per-item
# scores of safety samples (`Sample.scores`). A harmful item scores REFUSAL_RATE, a benign one
# OVER_REFUSAL_RATE (1.0 when refused), so each rate is the mean of its per-item value.
REFUSAL_RATE = "refusal_rate"
OVER_REFUSAL_RATE = "over_refusal_rate"
CORRECT = "correct"  # 1.0 when the refusal decision was the right one (refused iff harmful)
REFUSED = "refused"  # 1.0 when the response was judged a refusal
# Per-item scores of the long-generation benchmark (`toy_long`, suite `toy_long`): each item's
# repetition figures as numbers, so DuckDB `samples` holds them like any other score and the
# benchmark's score for each is their mean (`<benchmark>.looping` is that benchmark's looping rate).
LOOPING = "looping"  # 1.0 when the generation ends in a loop (`evals.repetition.loop_period`)
SEQ_REP_4 = "seq_rep_4"  # 1 - unique 4-grams / 4-grams
REP_W = "rep_w"  # Fu et al. 2021: share of tokens already among the previous 16 tokens
TRUNCATED = "truncated"  # 1.0 when the generation hit max_new_tokens
LONG_GENERATION_METRICS = (LOOPING, SEQ_REP_4, REP_W, TRUNCATED)
MEAN_REP_W = "mean_rep_w"  # report-level mean rep-w over every generation (beside MEAN_SEQ_REP_4)
# Hex digits of the content hash in an item id: with the position beside it, plenty to tell edits apart.
ITEM_HASH_CHARS = 12
GENERATION_METRICS = (REPETITION_RATE, MEAN_SEQ_REP_4, TRUNCATION_RATE, REFUSAL_RATE, OVER_REFUSAL_RATE)
# The figures candidates are compared by (the gated scores, repetition and refusal rates, sparsity and
# the decision) are logged once more under this prefix, so that they sort together as one column group
# in MLflow's runs table: ``compare.toy_math.exact_match``, ``compare.repetition_rate``, ...
COMPARE_PREFIX = "compare."
COMPARE_DECISION = "decision"  # compare.decision: 2 promoted, 1 passed, 0 rejected (or failed)


class GenParams(BaseModel):
    """Decoding settings shared by every backend.

    Attributes:
        max_new_tokens: the most tokens generated per prompt; hitting it is a truncation.
        temperature: 0 means greedy decoding; above 0 samples with this temperature.
        top_p: nucleus-sampling mass (1.0 = off); used only when sampling.
        repetition_penalty: 1.0 = off (the CTRL-style penalty of transformers and vLLM).
        seed: seeds the sampler (sampled decoding is reproducible for a seed).
        batch_size: prompts per forward batch of the transformers backend (and of lm-eval's
            "hf" model around it); the vLLM backend batches by `VllmSettings` instead.
        stop: extra stop strings; generation also stops at the tokenizer's EOS tokens.
            The text is cut before the first stop string.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    seed: int = 0
    batch_size: int = Field(default=8, ge=1)
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0)."""
        return self.temperature == 0.0


class LoopThresholds(BaseModel):
    """When a generation counts as `looping` (see `evals.repetition.loop_period`).

    A generation loops when its last tokens are one unit of `period` tokens repeated back to back,
    with 1 <= period <= max_period, over a tail of at least `min_tail_tokens` tokens AND at least
    `min_repeats` copies of the unit. A phrase said twice is therefore not a loop (min_repeats=3),
    and neither is a three-token stutter (min_tail_tokens).

    Attributes:
        max_period: the longest repeated unit looked for, in tokens.
        min_repeats: the fewest back-to-back copies of the unit (partial last copy counts pro rata).
        min_tail_tokens: the shortest periodic tail, in tokens.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_period: int = Field(default=64, ge=1)
    min_repeats: float = Field(default=3.0, ge=2.0)
    min_tail_tokens: int = Field(default=32, ge=2)


class SafetyData(BaseModel):
    """Local safety prompt files for real runs (see `evals.safety.load_prompts` for the formats).

    Attributes:
        files: CSV or JSONL files in the HarmBench, StrongREJECT or XSTest column format.
            HarmBench and StrongREJECT rows are harmful prompts; XSTest rows are harmful or
            benign look-alikes according to their `label` (or `type`) column.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    files: tuple[Path, ...] = ()


class VllmSettings(BaseModel):
    """How the vLLM engine is built (`--backend vllm`); recorded in every report (`EvalReport.engine`).

    The defaults suit a model whose bf16 weights take well under half of one GPU (a 7B/8B model on
    an 80 GB card); `configs/paper/*.yaml` set values for 14B and 32B models.

    Attributes:
        tensor_parallel_size: GPUs one model is split over (1 = one GPU).
        gpu_memory_utilization: share of each GPU's memory the engine may take (weights,
            activations and KV cache); vLLM fills what is left after the weights with KV cache.
        max_model_len: the longest sequence, prompt plus generation, in tokens; None = the model's
            own context length from its config. It must hold a prompt plus `gen.max_new_tokens`,
            and the KV cache must hold at least one sequence of this length.
        enforce_eager: run without CUDA graphs (saves their memory, 1-3 GB, at some decode speed).
        max_num_seqs: sequences decoded at once at most (vLLM's scheduler batch).
        batch_size: requests handed to the engine per call, for lm-eval tasks and safety prompts;
            "auto" = all at once, the scheduler batches them up to `max_num_seqs` (fastest).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.90, gt=0.0, le=1.0)
    max_model_len: int | None = Field(default=None, ge=16)
    enforce_eager: bool = False
    max_num_seqs: int = Field(default=256, ge=1)
    batch_size: int | Literal["auto"] = "auto"


class LongGeneration(BaseModel):
    """The long-generation probe of suites that have one (`toy_long`): open-ended prompts generated
    far past the length the models were trained on, where degenerate loops have room to show.

    Attributes:
        max_new_tokens: the most tokens generated per open-ended prompt (the toy zoo trains on
            sequences under 64 tokens; the default is eight times that).
        prompts: how many open-ended prompts (before `EvalSpec.limit`, which caps them too).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=512, ge=1)
    prompts: int = Field(default=40, ge=1, le=400)


class ItemSlice(BaseModel):
    """Which items of every benchmark an evaluation runs: positions [start, stop), counted after `limit`.

    A benchmark's items are in its own order (lm-eval's document order; a safety prompt list's
    order), and a slice is cut in the same units `EvalSpec.limit` counts in: per lm-eval task (each
    subtask of a group on its own), per kind for the toy safety prompts (harmful, benign) and per
    safety file. Two ways to give the bounds:

    - `unit="index"` (`ItemSlice(start=2, stop=5)`): item positions; `stop` None = to the end.
      Both are clipped to the items there are.
    - `unit="share"` (`ItemSlice.shares(0.25, 0.5)`): shares of each benchmark's item count n
      (after `limit`): positions floor(start * n) to floor(stop * n). Slices [0, a), [a, b),
      [b, 1] of one benchmark never overlap and together cover it, whatever its size (racing).

    Attributes:
        start: first position (or share), inclusive.
        stop: end position (or share), exclusive; None = the end.
        unit: "index" or "share".
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: int | float = Field(default=0, ge=0)
    stop: int | float | None = None
    unit: Literal["index", "share"] = "index"

    @classmethod
    def shares(cls, start: float, stop: float = 1.0) -> ItemSlice:
        """The slice [start, stop) of every benchmark's items as shares of its item count.

        Args:
            start: the share the slice starts at, 0 <= start < stop.
            stop: the share it ends at, <= 1.

        Returns:
            The slice.
        """
        return cls(start=start, stop=stop, unit="share")

    @model_validator(mode="after")
    def _bounds_make_sense(self) -> ItemSlice:
        # The messages follow the field name pydantic puts in front ("items: ...").
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"stop ({self.stop}) must be above start ({self.start})")
        if self.unit == "share" and max(self.start, self.stop if self.stop is not None else 0) > 1:
            raise ValueError(f"shares must lie in [0, 1], got [{self.start}, {self.stop})")
        if self.unit == "index" and not all(isinstance(v, int) for v in (self.start, self.stop or 0)):
            raise ValueError(
                f"item positions must be whole numbers, got [{self.start}, {self.stop}); "
                'for shares of the items use unit "share"'
            )
        return self

    def bounds(self, n: int) -> tuple[int, int]:
        """The slice's positions among n items.

        Args:
            n: the benchmark's item count (after `limit`).

        Returns:
            (first, end) with 0 <= first <= end <= n.
        """
        if self.unit == "share":
            stop = 1.0 if self.stop is None else self.stop
            return _share_position(self.start, n), _share_position(stop, n)
        stop = n if self.stop is None else min(int(self.stop), n)
        return min(int(self.start), n), stop


def _share_position(share: float, n: int) -> int:
    # floor(share * n), forgiving float error: 0.29 * 100 is 28.999999999999996 in binary.
    return min(n, math.floor(share * n + 1e-9))


def item_positions(n_items: int, limit: int | None, items: ItemSlice | None) -> range:
    """The positions of a benchmark's items that an evaluation runs: the first `limit`, then the slice.

    Args:
        n_items: the benchmark's item count.
        limit: `EvalSpec.limit` (None = all).
        items: `EvalSpec.items` (None = every item up to the limit).

    Returns:
        The positions, ascending.

    Example:
        >>> item_positions(100, 10, ItemSlice(start=2, stop=5)), item_positions(100, 8, ItemSlice.shares(0.5))
        (range(2, 5), range(4, 8))
    """
    n = n_items if limit is None else min(limit, n_items)
    return range(n) if items is None else range(*items.bounds(n))


def item_id(index: int, content: Any, *, task: str | None = None) -> str:
    """The stable id of one benchmark item: its position in the benchmark and a hash of its content.

    The content is the item as the benchmark defines it, before any rendering: an lm-eval task's
    document (question, choices, answer: the logged sample's `doc`), a safety prompt's text and
    label. Chat templates, few-shot examples and the prompt format are not part of it, so two models
    evaluated with the same suite, limit and toy seed share every item id, whatever their templates,
    and an item whose text changes gets a new id.

    Args:
        index: the item's position in its benchmark (lm-eval's doc_id; the safety prompt's position).
        content: the item's JSON-like record, hashed as canonical JSON (sorted keys).
        task: the subtask an item of a group belongs to (its doc_id counts within that subtask).

    Returns:
        "<index>-<hash>" (e.g. "17-3fa2c1d9e0b4"), or "<task>/<index>-<hash>" for a group's item.

    Example:
        >>> item_id(17, {"prompt": "37+45", "target": "82"})  # doctest: +SKIP
        '17-3fa2c1d9e0b4'
    """
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:ITEM_HASH_CHARS]
    return f"{task}/{index}-{digest}" if task else f"{index}-{digest}"


class EvalSpec(BaseModel):
    """One evaluation run: which suite, on which backend, with which decoding and thresholds.

    Attributes:
        suite: a name from `evals.catalog.SUITES` (e.g. "toy", "reasoning", "paper"); an unknown
            name is a validation error listing the known ones.
        backend: "transformers" (CPU or GPU) or "vllm" (GPU, optional extra).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        dtype: weights dtype for loading ("auto" = the checkpoint's own dtype).
        limit: at most this many samples per benchmark; None = every sample.
        items: evaluate only this slice of every benchmark's items (counted after `limit`); None =
            every item up to the limit. Item ids and per-item scores are those of a full run.
        long_gen: the long-generation probe's length and size (used only by suites that have it:
            `toy_long`); it decodes with `gen` but `long_gen.max_new_tokens`.
        gen: decoding settings, used by every benchmark of the suite (lm-eval tasks keep their
            own stop sequences; `gen.max_new_tokens` replaces their max_gen_toks). Left out (or
            None), it is filled with the suite's `default_gen` when the spec is built, so
            `spec.gen` always holds the settings actually used.
        toy_seed: seed of the toy test sets (`evals.toytasks.test_set`).
        loop: thresholds of the `looping` flag.
        safety: harmful / benign prompt files (real suites); the toy suite brings its own.
        chat_template: apply the tokenizer's chat template when it has one.
        judge: "matcher" (the documented refusal patterns) or a model directory used as judge.
        keep_samples: store per-sample generations in the report.
        vllm: engine settings of the vLLM backend (ignored by the transformers backend).
        trust_remote_code: let transformers / vLLM import and run Python files that come with the
            model (its `auto_map`). Off by default: such code runs with your permissions. When on,
            every load logs a warning naming the model.
        allow_pickle: load pickled `.bin` weights when a model has no safetensors. Off by default:
            unpickling can run arbitrary code.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str = "toy"
    backend: Literal["transformers", "vllm"] = "transformers"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    limit: int | None = Field(default=None, ge=1)
    items: ItemSlice | None = None
    gen: GenParams  # filled from the suite's default_gen when left out (see _fill_suite_defaults)
    toy_seed: int = 0
    long_gen: LongGeneration = LongGeneration()
    loop: LoopThresholds = LoopThresholds()
    safety: SafetyData = SafetyData()
    chat_template: bool = True
    judge: str = "matcher"
    keep_samples: bool = True
    vllm: VllmSettings = VllmSettings()
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @model_validator(mode="before")
    @classmethod
    def _fill_suite_defaults(cls, data: Any) -> Any:
        """Check the suite name and give `gen` the suite's default decoding when it is left out."""
        if not isinstance(data, dict):
            return data
        suite = get_suite(data.get("suite", "toy"))  # EvalError (a ValueError): pydantic names the field
        if data.get("gen") is None:
            data = {**data, "gen": GenParams(**suite.default_gen)}
        return data

    @model_validator(mode="after")
    def _slice_within_limit(self) -> EvalSpec:
        """An item slice that starts at or past the limit would evaluate nothing."""
        items, limit = self.items, self.limit
        if items is not None and items.unit == "index" and limit is not None and items.start >= limit:
            raise ValueError(
                f"items.start ({items.start}) must be below limit ({limit}): it would select no item"
            )
        return self

    @model_validator(mode="after")
    def _generation_fits_the_engine(self) -> EvalSpec:
        """A vLLM engine whose max_model_len cannot hold max_new_tokens would fail every request."""
        limit = self.vllm.max_model_len
        if self.backend == "vllm" and limit is not None and limit <= self.gen.max_new_tokens:
            raise ValueError(
                f"vllm.max_model_len ({limit}) must exceed gen.max_new_tokens ({self.gen.max_new_tokens}): "
                "it holds the prompt plus the generation"
            )
        return self


class BenchmarkScore(BaseModel):
    """One metric of one benchmark. Its stable name downstream is `<benchmark>.<metric>`."""

    benchmark: str
    metric: str
    value: float
    stderr: float | None  # None when the harness could not compute one (n < 2)
    n: int  # samples scored (after `limit`)
    n_total: int  # samples the benchmark has
    higher_is_better: bool
    version: str  # task version (lm-eval metadata.version), stored beside every score


class RepetitionStats(BaseModel):
    """Repetition over a set of generations.

    Attributes:
        repetition_rate: share of generations flagged `looping`.
        mean_seq_rep_4: mean of per-generation seq_rep_4 (1 - unique 4-grams / 4-grams).
        mean_rep_w: mean of per-generation rep-w (`evals.repetition.rep_w`, w = 16).
        truncation_rate: share of generations that hit max_new_tokens without stopping.
        n: generations counted.
    """

    repetition_rate: float
    mean_seq_rep_4: float
    truncation_rate: float
    n: int
    mean_rep_w: float = 0.0  # mean of per-generation rep-w (0.0 in reports written before it existed)


class SafetyScores(BaseModel):
    """Refusal behaviour.

    Attributes:
        refusal_rate: share of harmful prompts refused (higher is better); None without harmful prompts.
        over_refusal_rate: share of benign look-alike prompts refused (lower is better); None
            without benign prompts.
        n_harmful: harmful prompts scored.
        n_benign: benign prompts scored.
        judge: which judge decided what a refusal is.
    """

    refusal_rate: float | None
    over_refusal_rate: float | None
    n_harmful: int
    n_benign: int
    judge: str


class Sample(BaseModel):
    """One benchmark item: its generation, repetition figures and per-item scores.

    Attributes:
        benchmark: the benchmark (requested lm-eval task or group, `toy_safety`, `safety`).
        item_id: the item's stable id (`item_id()`): the same item has the same id in every run
            with the same suite, limit and toy seed, for every model and in every `ItemSlice`.
        prompt: the prompt as the model saw it (chat template and few-shot examples included).
        text: the generated text ("" for an item scored by log-likelihood, with no generation).
        token_ids: the generated token ids.
        n_tokens: generated tokens (len(token_ids)).
        finish_reason: "stop" or "length"; None for an item scored without generating
            (log-likelihood tasks such as MMLU): such items count in no repetition figure.
        seq_rep_4, rep_w, looping, loop_period, truncated: repetition figures (`evals.repetition`).
        target: the expected answer ("refusal" or "answer" for safety prompts).
        correct: exact match / accuracy (reasoning, the first filter) or the right refusal decision.
        refused: safety samples only.
        scores: the item's value of every metric its benchmark reports, named as
            `BenchmarkScore.metric` names them (lm-eval filter suffix included, e.g.
            `exact_match_strict-match`); a mean-aggregated metric's benchmark score is the mean
            of this value over the benchmark's samples. Safety samples: `correct`, `refused`, and
            `refusal_rate` (harmful) or `over_refusal_rate` (benign), both = refused. Metrics whose
            per-item value is not one number (lm-eval's per-instruction lists, BLEU pairs) are left out.
    """

    benchmark: str
    item_id: str
    prompt: str
    text: str
    token_ids: list[int]
    n_tokens: int
    finish_reason: FinishReason | None
    seq_rep_4: float
    looping: bool
    loop_period: int | None
    truncated: bool
    rep_w: float = 0.0  # 0.0 in samples written before it was recorded
    target: str | None = None
    correct: bool | None = None
    refused: bool | None = None
    scores: dict[str, float] = {}


class EvalReport(BaseModel):
    """Everything one `evaluate()` call measured, with what is needed to reproduce it."""

    model: str
    suite: str
    backend: str
    device: str
    spec: EvalSpec
    gen_params: GenParams  # resolved decoding settings actually used
    eos_token_ids: list[int]
    # The settings the engine was built and driven with: for vLLM the keyword arguments of
    # vllm.LLM (the model path aside) and the request batch size; for transformers the device,
    # dtype and batch size. Empty in reports written before it was recorded.
    engine: dict[str, Any] = {}
    benchmarks: list[BenchmarkScore]
    repetition: RepetitionStats  # over every generation of the run
    repetition_by_benchmark: dict[str, RepetitionStats]
    safety: SafetyScores | None
    samples: list[Sample]
    seconds: float
    lib_versions: dict[str, str]

    def metrics(self) -> dict[str, float]:
        """The run's figures under their stable names (`<benchmark>.<metric>`, `repetition_rate`, ...).

        Returns:
            name -> value, the names MLflow, DuckDB and the gate use.
        """
        out = {f"{s.benchmark}.{s.metric}": s.value for s in self.benchmarks}
        out[REPETITION_RATE] = self.repetition.repetition_rate
        out[MEAN_SEQ_REP_4] = self.repetition.mean_seq_rep_4
        out[TRUNCATION_RATE] = self.repetition.truncation_rate
        if self.safety is not None and self.safety.refusal_rate is not None:
            out[REFUSAL_RATE] = self.safety.refusal_rate
        if self.safety is not None and self.safety.over_refusal_rate is not None:
            out[OVER_REFUSAL_RATE] = self.safety.over_refusal_rate
        return out

    def write_json(self, path: Path) -> Path:
        """Write the report as JSON, atomically (a temporary sibling renamed into place).

        Args:
            path: destination file.

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def read_json(cls, path: Path) -> EvalReport:
        """Load a report written by `write_json`.

        Args:
            path: the JSON file.

        Returns:
            The report.
        """
        return cls.model_validate_json(Path(path).read_text())
