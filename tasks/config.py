"""The one pipeline config schema: what `scf nightly` / `scf run` and the Prefect flows run.

A config names its sources, the candidates (methods x parameter grid), merge settings, the
evaluation (an ``evals.spec.EvalSpec``), the gate policy and where results live. It is validated
completely when it loads, method parameters included, so a typo fails before any model is touched.

Example (``configs/demo.yaml``)::

    name: demo
    sources: {base: "zoo:base", secondary: ["zoo:math"]}
    candidates:
      - {method: scf_rkl, grid: {alpha: [1.0, 1.5]}}
      - {method: ties, params: {weight: 1.0}, grid: {density: [0.3, 0.5]}}
    eval: {suite: toy, limit: 8}
    gate: {benchmarks: {math.exact_match: {tolerance: 0.05}}}
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evals.catalog import SUITES, get_suite
from evals.spec import EvalSpec
from scf.errors import ScfError
from scf.methods.registry import METHODS, get_method, validate_params
from scf.spec import EngineSettings
from scf.yamlsafe import load_yaml
from tasks.errors import PipelineError
from tasks.gate import GatePolicy
from tasks.notify import NotifySettings

ZOO_PREFIX = "zoo:"
# Credentials a night may take from Prefect Secret blocks (``secrets:``) instead of the environment.
SecretVariable = Literal[
    "HF_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"
]

# The run form's dropdowns, generated from the method registry and the suite catalog when this module
# is imported (never a hand-kept list): Prefect renders a Literal as an enum in the parameter schema.
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]
SuiteName = Literal[tuple(SUITES)]  # type: ignore[valid-type]
# The config name of a run whose parameters name no config file (its MLflow experiment, DuckDB rows).
REQUEST_NAME = "on-demand"


class ZooSettings(BaseModel):
    """Which toy zoo ``zoo:<model>`` sources refer to (built on first use)."""

    model_config = ConfigDict(extra="forbid")
    size: Literal["tiny", "small"] = "tiny"
    seed: int = 0


class Sources(BaseModel):
    """Input models. Each is a hub id with an optional ``@revision``, a local path, or ``zoo:<model>``.

    Attributes:
        base: the model whose behaviour is preserved (SCF-RKL's base).
        secondary: one or more models contributing capabilities.
        reference: the common ancestor, needed by task-vector methods (mergekit's ``base_model``).
    """

    model_config = ConfigDict(extra="forbid")
    base: str = Field(min_length=1, description="the model whose behaviour is preserved")
    secondary: list[str] = Field(min_length=1, description="one or more models contributing capabilities")
    reference: str | None = Field(None, description="the common ancestor (task-vector methods need it)")

    @field_validator("secondary", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def parents(self) -> dict[str, str]:
        """Role -> ref of the models candidates are compared with: base and secondaries."""
        return {"base": self.base, **{f"secondary_{i}": ref for i, ref in enumerate(self.secondary)}}

    def roles(self) -> dict[str, str]:
        """Role -> ref of every source: the parents, then the reference when there is one."""
        return {**self.parents(), **({"reference": self.reference} if self.reference else {})}


class CandidateGrid(BaseModel):
    """One method with fixed ``params`` and a ``grid`` of values to sweep (cartesian product).

    Attributes:
        method: a merge method name (``scf.methods.registry.METHODS``).
        params: parameters shared by every candidate of this entry.
        grid: parameter -> list of values; one candidate per combination.
        seeds: merge seeds (random methods: DARE, DELLA): one candidate per grid point and seed,
            each merged with its own seed instead of ``merge.seed``; empty = ``merge.seed`` only.
    """

    model_config = ConfigDict(extra="forbid")
    method: str
    params: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    seeds: list[int] = []

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or any(seed < 0 for seed in seeds):
            raise ValueError(f"must be distinct non-negative integers, got {seeds}")
        return seeds

    @field_validator("grid")
    @classmethod
    def _non_empty_lists(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid.{key} is an empty list; give at least one value")
        return grid


class MergeSettings(EngineSettings):
    """Engine settings shared by every candidate: ``scf.spec.EngineSettings`` (device, dtype, seed,
    shard_size, validated exactly as ``scf merge`` validates them) plus how the pipeline runs a merge.

    Attributes:
        timeout_s: a merge still running after this many seconds is killed and its candidate
            recorded ``failed`` (default 6 h: a 70B merge on a slow disk takes about one).
        tokenizer_source: when the parents' vocabularies differ: ``base``, ``union``, or a source
            role (``secondary_0``, ``reference``) or a source as written under ``sources:``, whose
            tokenizer the merged model gets (``scf merge --tokenizer-source``; docs/merging.md).
        diagnostics: write the paper's section-3 diagnostics to each merge report (spectral shift
            and largest principal angle of ``diagnostic_layers``, per-layer sparsity); one SVD per
            diagnosed matrix, so off by default.
        diagnostic_layers: glob patterns of the 2-D tensors to diagnose (``scf merge
            --diagnostic-layers``); empty = the attention and MLP weights of a few evenly spaced layers.
    """

    timeout_s: float = Field(6 * 3600, gt=0)
    tokenizer_source: str | None = Field(None, min_length=1)
    diagnostics: bool = False
    diagnostic_layers: list[str] = []

    def engine_settings(self) -> dict[str, Any]:
        """The fields a ``MergeSpec`` takes from here (not the pipeline's timeout, nor the tokenizer
        source, which names a role the flow resolves to a path)."""
        return self.model_dump(exclude={"timeout_s", "tokenizer_source"})

    def report_settings(self) -> dict[str, Any] | None:
        """What changes a merge's report but not its weights (part of the merge's cache key), or None."""
        if not self.diagnostics:
            return None
        return {"diagnostics": True, "diagnostic_layers": self.diagnostic_layers}


class RacingSettings(BaseModel):
    """``eval.racing``: evaluate every model in stages of its items and stop early the candidates the
    stages so far already prove fail the gate.

    Attributes:
        stages: increasing shares of every benchmark's items, ending at 1.0. Stage k evaluates the
            items between share k-1 and share k, so no item is generated twice.
    """

    model_config = ConfigDict(extra="forbid")
    stages: list[float] = Field(default=[0.25, 0.5, 1.0], min_length=1)

    @field_validator("stages")
    @classmethod
    def _increasing_to_one(cls, stages: list[float]) -> list[float]:
        if any(not 0 < share <= 1 for share in stages) or stages != sorted(set(stages)) or stages[-1] != 1:
            raise ValueError(f"must be increasing shares in (0, 1] ending at 1.0, got {stages}")
        return stages


class EvalSettings(EvalSpec):
    """The ``eval:`` section: an ``evals.spec.EvalSpec`` plus how the pipeline runs it.

    Attributes:
        timeout_s: an evaluation still running after this many seconds is killed and its model
            recorded ``failed`` (default 12 h: the paper suite on a 32B model with vLLM takes hours).
        racing: evaluate in stages and stop hopeless candidates early (None: every item at once).
    """

    timeout_s: float = Field(12 * 3600, gt=0)
    racing: RacingSettings | None = None

    def spec(self) -> EvalSpec:
        """The evaluation itself (what the cache key hashes): everything but the pipeline settings."""
        return EvalSpec.model_validate(self.model_dump(exclude={"timeout_s", "racing"}))


class ExecutionSettings(BaseModel):
    """The ``execution:`` section: where candidates run.

    Attributes:
        mode: ``local``: every candidate on this machine, each merge and evaluation in a child
            process; ``pool``: each candidate (and each parent evaluation) is a run of the
            ``merge-and-evaluate`` deployment on whichever worker of ``work_pool`` is free.
        work_pool: the Prefect work pool (required for ``pool``).
        work_queue: a queue of that pool (default: the deployment's).
        max_parallel: pool mode: runs at once.
        deployment: pool mode: the deployment each candidate runs as.
        retries: pool mode: a run that crashed or whose worker died is submitted again this many times
            before its candidate is recorded ``failed``.
        heartbeat_timeout_s: pool mode: a running flow run that sent no heartbeat for this long is
            taken as lost (its worker died) and marked crashed. Workers send one every
            ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (Prefect's default 180; set 30 on workers
            and about 90 here to notice a lost worker within two minutes).
        gpu_lock: ``auto`` (GPU steps take the machine's GPU lock), ``on`` (every step does), ``off``.
    """

    model_config = ConfigDict(extra="forbid")
    mode: Literal["local", "pool"] = "local"
    work_pool: str | None = None
    work_queue: str | None = None
    max_parallel: int = Field(2, ge=1)
    deployment: str = "merge-and-evaluate/merge-and-evaluate"
    retries: int = Field(1, ge=0, le=10)
    heartbeat_timeout_s: float = Field(600, ge=10)
    gpu_lock: Literal["auto", "on", "off"] = "auto"

    @model_validator(mode="after")
    def _pool_needs_a_pool(self) -> ExecutionSettings:
        if self.mode == "pool" and not self.work_pool:
            raise ValueError("execution.work_pool: mode 'pool' needs the name of a Prefect work pool")
        return self


class Storage(BaseModel):
    """Where outputs and stores live. Relative paths are relative to the current directory.

    Attributes:
        workdir: merged models, Prefect results, plots; default ``.scf/<name>``.
        mlflow_uri: MLflow tracking URI; default ``$MLFLOW_TRACKING_URI`` or a sqlite file in workdir.
        duckdb: the results database; default ``<workdir>/results.duckdb``.
        models_dir: where merged candidates are written; default ``<workdir>/candidates``. In pool
            mode every worker must reach it (an NFS or object-store mount).
        result_storage: where finished merges and evaluations are persisted (the cache, and how pool
            runs hand their results back): a Prefect block slug such as ``s3-bucket/scf-results``
            or ``remote-file-system/scf``; default a local directory ``<workdir>/prefect-results``.
    """

    model_config = ConfigDict(extra="forbid")
    workdir: Path | None = None
    mlflow_uri: str | None = None
    duckdb: Path | None = None
    models_dir: Path | None = None
    result_storage: str | None = None


class Candidate(BaseModel):
    """One expanded candidate: a method with concrete, validated parameters."""

    method: str
    params: dict[str, Any]  # resolved: defaults filled by the method's params model
    swept: dict[str, Any] = {}  # the params that distinguish it from other candidates of its method
    seed: int | None = None  # its own merge seed (``seeds:``); None = ``merge.seed``

    @property
    def label(self) -> str:
        """A readable name for logs and the UI, e.g. ``scf_rkl-alpha=1.5`` or ``dare_ties-seed=2``."""
        parts = [f"{key}={_short(value)}" for key, value in sorted(self.swept.items())]
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return f"{self.method}-{','.join(parts)}" if parts else self.method


class PipelineConfig(BaseModel):
    """A pipeline run: sources, candidates, merge, eval, gate, storage."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    zoo: ZooSettings = ZooSettings()
    sources: Sources
    candidates: list[CandidateGrid] = Field(min_length=1)
    merge: MergeSettings = MergeSettings()
    eval: EvalSettings = EvalSettings()
    gate: GatePolicy
    storage: Storage = Storage()
    execution: ExecutionSettings = ExecutionSettings()
    notify: NotifySettings = NotifySettings()
    secrets: dict[SecretVariable, str] = Field(
        default={},
        description="environment variable -> the name of a Prefect Secret block holding its value",
    )
    keep_candidates: bool = False
    concurrency: int = Field(2, ge=1, description="local mode: candidate evaluations run at once")

    @model_validator(mode="after")
    def _racing_runs_here(self) -> PipelineConfig:
        if self.eval.racing is not None and self.execution.mode == "pool":
            raise ValueError("eval.racing: racing runs in execution.mode 'local' only (a pool run evaluates "
                             "every item of its candidate)")
        if self.eval.racing is not None and self.eval.items is not None:
            raise ValueError("eval.racing: racing chooses the items of each stage; leave eval.items unset")
        return self

    @model_validator(mode="after")
    def _tokenizer_source_names_a_source(self) -> PipelineConfig:
        choice = self.merge.tokenizer_source
        if choice is not None and self.tokenizer_role() is None and choice != "union":
            roles = ", ".join(dict.fromkeys(["base", "union", *self.sources.roles()]))
            raise ValueError(f"merge.tokenizer_source: {choice!r} is none of {roles} "
                             "nor a source as written under sources:")
        return self

    def tokenizer_role(self) -> str | None:
        """The source role ``merge.tokenizer_source`` names (``base``, ``secondary_0``, ...), if any."""
        choice = self.merge.tokenizer_source
        refs = self.sources.roles()
        if choice in refs:
            return choice
        return next((role for role, ref in refs.items() if ref == choice), None)

    @model_validator(mode="after")
    def _validate_candidates(self) -> PipelineConfig:
        # Validate every grid point now (not in the middle of a nightly run). ScfError names the key.
        for index, entry in enumerate(self.candidates):
            where = f"candidates.{index}"
            try:
                if get_method(entry.method).needs_reference and self.sources.reference is None:
                    needs = "needs sources.reference (the common ancestor)"
                    raise ValueError(f"{where}.method: {entry.method!r} {needs}")
                for params in _grid_points(entry):
                    validate_params(entry.method, params, n_models=1 + len(self.sources.secondary))
            except ScfError as err:
                raise ValueError(f"{where}: {err}") from None
        return self

    def expand(self) -> list[Candidate]:
        """Every candidate of the sweep, in config order, duplicates removed.

        Returns:
            The candidates, with parameters resolved (defaults filled in) and labelled by the
            parameters that vary between candidates of the same method.
        """
        out: dict[str, Candidate] = {}
        n_models = 1 + len(self.sources.secondary)
        for entry in self.candidates:
            for params in _grid_points(entry):
                resolved = validate_params(entry.method, params, n_models).model_dump(mode="json")
                for seed in entry.seeds or [None]:
                    candidate = Candidate(method=entry.method, params=resolved, seed=seed)
                    out.setdefault(canonical_json([candidate.method, candidate.params, seed]), candidate)
        candidates = list(out.values())
        for candidate in candidates:
            siblings = [other.params for other in candidates if other.method == candidate.method]
            candidate.swept = {
                key: value
                for key, value in candidate.params.items()
                if any(canonical_json(other.get(key)) != canonical_json(value) for other in siblings)
            }
        return candidates

    @property
    def workdir(self) -> Path:
        """Absolute working directory: merged models, caches, plots, default stores."""
        return (self.storage.workdir or Path(".scf") / self.name).resolve()

    @property
    def models_dir(self) -> Path:
        """Absolute directory of the merged candidates (``<models_dir>/<candidate id>``)."""
        return (self.storage.models_dir or self.workdir / "candidates").resolve()

    @property
    def duckdb_path(self) -> Path:
        """Absolute path of the results database."""
        return (self.storage.duckdb or self.workdir / "results.duckdb").resolve()

    @property
    def mlflow_uri(self) -> str:
        """The MLflow tracking URI: the config's, else ``$MLFLOW_TRACKING_URI``, else sqlite in workdir."""
        return (
            self.storage.mlflow_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{self.workdir / 'mlflow.db'}"
        )


def _grid_points(entry: CandidateGrid) -> list[dict[str, Any]]:
    """The cartesian product of an entry's grid, each merged over its fixed params."""
    keys = sorted(entry.grid)
    return [
        {**entry.params, **dict(zip(keys, values, strict=True))}
        for values in itertools.product(*(entry.grid[key] for key in keys))
    ]


def _short(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, list | dict) else str(value)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the input of every content hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(value: Any) -> str:
    """sha256 hex of ``canonical_json(value)``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def candidate_id(fingerprints: dict[str, str], candidate: Candidate, merge: MergeSettings) -> str:
    """The content id of a merged candidate: same inputs, method, params and weight-changing settings,
    same id (device is left out: it changes speed, not the result beyond float rounding).

    Args:
        fingerprints: role -> source fingerprint (base, secondary_i, reference).
        candidate: the method and resolved params.
        merge: the merge settings.

    Returns:
        16 hex characters.
    """
    key = {
        "sources": fingerprints,
        "method": candidate.method,
        "params": candidate.params,
        "dtype": merge.dtype,
        "seed": merge.seed if candidate.seed is None else candidate.seed,
    }
    if merge.tokenizer_source is not None:  # absent otherwise: existing ids stay the same
        key["tokenizer_source"] = merge.tokenizer_source
    return content_hash(key)[:16]


def parent_id(fingerprint: str) -> str:
    """The model id of a parent: its source fingerprint, shortened."""
    return f"p-{fingerprint[:14]}"


def load_config(path: str | Path, **overrides: Any) -> PipelineConfig:
    """Load and validate a pipeline config.

    Args:
        path: the YAML file.
        **overrides: top-level keys replacing the file's (e.g. ``keep_candidates=True``); None is ignored.

    Returns:
        The validated config.

    Raises:
        PipelineError: unreadable file, bad YAML, or an invalid key; the message names the file and the key.
    """
    raw = read_config(path)
    raw.update({key: value for key, value in overrides.items() if value is not None})
    return validate_config(raw, str(path))


def read_config(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping, not yet validated.

    Raises:
        PipelineError: unreadable file, bad YAML, or not a mapping; the message names the file.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise PipelineError(f"cannot read config {path}: {err.strerror}") from None
    try:  # bounded: a YAML alias bomb is refused, not expanded (see scf.yamlsafe)
        raw = load_yaml(text, str(path))
    except ScfError as err:
        raise PipelineError(str(err)) from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: the top level must be a mapping (name, sources, candidates, ...)")
    return raw


def validate_config(raw: dict[str, Any], where: str, *, strip: str | None = None) -> PipelineConfig:
    """Validate a config mapping; every problem in one line, ``<where>: invalid config: <key>: <why>; ...``.

    Args:
        raw: the mapping (a file's, with overrides applied).
        where: what the message names first (the file, or the run's parameters).
        strip: a key prefix left out of the messages (``candidates.0`` when the run's ``method`` and
            ``params`` are that candidate: the message then names ``params.<key>`` as the form does).
    """
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(error) for error in err.errors()]
        if strip:  # "candidates.0: x" and "candidates.0.method: x" as "x" and "method: x"
            problems = [problem.removeprefix(f"{strip}: ").removeprefix(f"{strip}.") for problem in problems]
        raise PipelineError(f"{where}: invalid config: {'; '.join(problems)}") from None


class EvalChoice(BaseModel):
    """The run form's evaluation: a suite (dropdown) and the two settings a user changes most.

    Unset fields keep the base config's (or the suite's) values.
    """

    model_config = ConfigDict(extra="forbid")
    suite: SuiteName | None = Field(None, description="an evaluation suite of evals.catalog")
    limit: int | None = Field(None, description="at most this many items per benchmark")
    max_new_tokens: int | None = Field(None, description="the most tokens generated per prompt")


def request_config(
    config_path: str | Path | None = None,
    *,
    name: str | None = None,
    sources: Sources | dict[str, Any] | None = None,
    method: str | None = None,
    params: dict[str, Any] | None = None,
    evaluation: EvalChoice | dict[str, Any] | None = None,
    gate: GatePolicy | dict[str, Any] | None = None,
    gate_config: str | None = None,
    storage: Storage | dict[str, Any] | None = None,
    mode: str | None = None,
    racing: bool | None = None,
    **overrides: Any,
) -> PipelineConfig:
    """A run's whole request (the Prefect form, or ``scf run``'s flags) as one validated config.

    ``config_path``, when given, is the base: every field given here replaces or edits its value.
    Without it the request must be complete (sources, method, gate). Everything is validated by the
    one schema (``PipelineConfig``), so the errors are the ones a config file gets.

    Args:
        config_path: a pipeline YAML to start from (None: nothing but the fields below).
        name: the config name (MLflow experiment, DuckDB rows); default the base's, or ``on-demand``.
        sources: replaces the base's ``sources``.
        method: the one candidate's merge method (replaces the base's ``candidates``).
        params: that candidate's parameters, validated against the method's params model.
        evaluation: ``suite``, ``limit`` and ``gen.max_new_tokens`` of ``eval``.
        gate: the gate policy; or ``gate_config``: a config (path, or name in ``configs/``) whose gate to use.
        storage: replaces the base's ``storage``.
        mode: ``execution.mode``.
        racing: turn ``eval.racing`` on (the base's stages, or the default ones) or off.
        **overrides: other top-level keys (``keep_candidates``, ``concurrency``); None is ignored.

    Raises:
        PipelineError: one line naming the key, e.g. ``the run's parameters: invalid config: method
            'scf_rkl': invalid params: params.alpah: unknown parameter (did you mean 'alpha'?); ...``.
    """
    form = {"name": name, "sources": sources, "method": method, "params": params, "evaluation": evaluation,
            "gate": gate, "gate_config": gate_config, "storage": storage}
    given = [key for key, value in form.items() if value is not None]
    where = "the run's parameters" if config_path is None else str(config_path)
    if given and config_path is not None:
        where = f"{config_path} with the run's parameters"
    raw = read_config(config_path) if config_path is not None else {"name": REQUEST_NAME}
    if params is not None and method is None:
        raise PipelineError(f"{where}: params needs method (the merge method they are parameters of)")
    if gate is not None and gate_config is not None:
        raise PipelineError(f"{where}: give gate or gate_config, not both")
    if gate_config is not None:
        raw["gate"] = load_config(_config_file(gate_config)).gate.model_dump(mode="json")
    for key in ("name", "sources", "gate", "storage"):
        if form[key] is not None:
            raw[key] = _plain(form[key])
    if method is not None:
        raw["candidates"] = [{"method": method, "params": dict(params or {})}]
    if evaluation is not None:
        raw["eval"] = _eval_section(raw.get("eval"), _plain(evaluation))
    if mode is not None:
        raw["execution"] = {**_section(raw.get("execution")), "mode": mode}
    if racing is not None:
        section = _section(raw.get("eval"))
        section["racing"] = (section.get("racing") or {}) if racing else None
        raw["eval"] = section
    raw.update({key: value for key, value in overrides.items() if value is not None})
    return validate_config(raw, where, strip="candidates.0" if method is not None else None)


def _config_file(name_or_path: str) -> Path:
    """A config named by path, or by bare name (``demo`` is ``configs/demo.yaml``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    return Path("configs") / f"{name_or_path}.yaml"


def _plain(value: Any) -> Any:
    """A form value as the plain mapping a config file would hold (unset fields left out)."""
    return value.model_dump(mode="json", exclude_unset=True) if isinstance(value, BaseModel) else value


def _section(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _eval_section(base: Any, choice: dict[str, Any]) -> dict[str, Any]:
    """The base's ``eval`` with the form's suite, limit and max_new_tokens applied."""
    section = _section(base)
    for key in ("suite", "limit"):
        if choice.get(key) is not None:
            section[key] = choice[key]
    if choice.get("max_new_tokens") is not None:
        suite = section.get("suite", "toy")
        defaults = dict(get_suite(suite).default_gen) if suite in SUITES else {}
        gen = {**defaults, **_section(section.get("gen"))}
        section["gen"] = {**gen, "max_new_tokens": choice["max_new_tokens"]}
    return section


def _describe(error: dict) -> str:
    """One pydantic error as ``<key>: <message>``, listing the allowed keys for an unknown one."""
    loc = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if not loc:  # a check across sections: its message names the keys
        return message
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1])
        return f"{loc}: unknown key; allowed: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{loc}: required key is missing"
    return f"{loc}: {message}"


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the model found by walking ``loc`` down from ``PipelineConfig``."""
    model: Any = PipelineConfig
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        annotation = model.model_fields[part].annotation
        args = getattr(annotation, "__args__", ())
        args = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        model = annotation if isinstance(annotation, type) else next(iter(args), None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []
