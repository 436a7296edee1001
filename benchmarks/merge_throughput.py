"""Merge throughput benchmark: wall time over the I/O floor, and peak memory, per merge method.

Builds (once, cached under ``--workdir``) a synthetic checkpoint family shaped like a real model:
a ``reference`` (the common ancestor), a ``base`` fine-tuned from it and a ``secondary`` fine-tuned
from the base, as random bf16 tensors with the exact tensor names and shapes of
``Qwen2ForCausalLM``, sharded safetensors with ``model.safetensors.index.json`` and a
``config.json``. Then, in one run:

1. the I/O floor: read every input tensor with safetensors and write the base's tensors as one
   sharded output (same per-tensor streaming pattern as a merge, no compute), once for two inputs
   (base + secondary) and once for three (+ reference), before and after the merges;
2. each method: ``scf.merge.merge`` in a fresh subprocess, timing the call and reading the
   subprocess's peak RSS (and, on a GPU, its peak of GPU memory allocated by torch);
3. with ``--mergekit``: mergekit (installed into its own virtualenv, never a project dependency)
   on the same inputs for the methods it shares with us, its time, and the per-tensor difference
   between its output and ours.

Usage:
    python benchmarks/merge_throughput.py --shape qwen2.5-1.5b --mergekit
    python benchmarks/merge_throughput.py --shape tiny --methods scf_rkl,ties

See benchmarks/README.md for what the numbers mean and benchmarks/RESULTS.md for recorded runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

INDEX_NAME = "model.safetensors.index.json"
RESULT_PREFIX = "RESULT "  # children print their result as the last stdout line: RESULT {json}
MERGEKIT_RUNNER = Path(__file__).with_name("_mergekit_runner.py")
DEFAULT_MERGEKIT_VENV = Path("/tmp/scf-bench-mergekit-venv")
MERGEKIT_VERSION = "0.1.5"  # the version our methods are compared with

# Parameters every method runs with, the same on our side and mergekit's, so outputs are
# comparable. Names are mergekit's (and ours). Methods not listed run with their defaults.
# A list gives one value per model, [base, secondary].
BENCH_PARAMS: dict[str, dict] = {
    "linear": {"weight": 0.5},
    "task_arithmetic": {"weight": 0.5},
    "ties": {"weight": 0.5, "density": 0.5},
    "dare_linear": {"weight": 0.5, "density": 0.5},
    "dare_ties": {"weight": 0.5, "density": 0.5},
    "sce": {"select_topk": 0.5},
    "slerp": {"t": 0.3},
    "nuslerp": {"weight": [0.4, 0.6]},
    "multislerp": {"weight": [0.4, 0.6]},
    "nearswap": {"t": 0.0005},
    "model_stock": {},
    "breadcrumbs": {"weight": 0.5, "density": 0.5, "gamma": 0.01},
    "breadcrumbs_ties": {"weight": 0.5, "density": 0.5, "gamma": 0.01},
    "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.15},
    "della_linear": {"weight": 0.5, "density": 0.5, "epsilon": 0.15},
}

# Our method -> mergekit's method computing the same thing (scf_kl is the exact version of
# mergekit's arcee_fusion, which subsamples its quantiles: compared for time, not for equality).
MERGEKIT_EQUIVALENT = {
    "linear": "linear",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "sce": "sce",
    "scf_kl": "arcee_fusion",
    **{name: name for name in ("slerp", "nuslerp", "multislerp", "nearswap", "model_stock", "breadcrumbs",
                                "breadcrumbs_ties", "della", "della_linear")},
}
APPROXIMATE_IN_MERGEKIT = {"arcee_fusion"}
# mergekit's base_model for each method, by our role: our base (mergekit computes "from the base
# towards the other model"), our reference (task vectors; optional for nuslerp and multislerp, given
# here), or none (linear).
MERGEKIT_BASE_MODEL = {"arcee_fusion": "base", "slerp": "base", "nearswap": "base", "linear": None}


# --------------------------------------------------------------------------------------------
# The synthetic checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a Qwen2ForCausalLM checkpoint (values from the published config.json).

    Attributes:
        name: the ``--shape`` choice.
        vocab: vocabulary size (embedding rows).
        hidden: hidden size.
        intermediate: MLP inner size.
        layers: number of decoder layers.
        heads: attention heads; head_dim = hidden / heads.
        kv_heads: key/value heads (grouped-query attention).
        input_shard_bytes: shard size of the synthetic inputs, small enough that they are sharded.
    """

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    input_shard_bytes: int


SHAPES = {
    "qwen2.5-0.5b": ModelShape("qwen2.5-0.5b", 151936, 896, 4864, 24, 14, 2, 400_000_000),
    "qwen2.5-1.5b": ModelShape("qwen2.5-1.5b", 151936, 1536, 8960, 28, 12, 2, 1_000_000_000),
    "tiny": ModelShape("tiny", 1024, 64, 160, 2, 4, 2, 200_000),
}


def tensor_layout(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Qwen2ForCausalLM state dict with tied embeddings.

    Args:
        shape: the model's dimensions.

    Returns:
        ``(name, shape)`` pairs in the order transformers lists them (no ``lm_head.weight``: the
        output projection is tied to the embedding).
    """
    head_dim = shape.hidden // shape.heads
    kv_dim = shape.kv_heads * head_dim
    h, i = shape.hidden, shape.intermediate
    layout: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        layout += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv_dim, h)),
            (p + "self_attn.k_proj.bias", (kv_dim,)),
            (p + "self_attn.v_proj.weight", (kv_dim, h)),
            (p + "self_attn.v_proj.bias", (kv_dim,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    layout.append(("model.norm.weight", (h,)))
    return layout


def largest_tensor_fp32_bytes(shape: ModelShape) -> int:
    """Bytes of the largest tensor of the model in float32 (the unit of the memory target)."""
    return max(_numel(dims) for _, dims in tensor_layout(shape)) * 4


def qwen2_config(shape: ModelShape) -> dict:
    """The ``config.json`` of the synthetic checkpoints (Qwen2.5 base-model values).

    Args:
        shape: the model's dimensions.

    Returns:
        A transformers ``Qwen2Config`` dict that ``AutoConfig`` and mergekit both read.
    """
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "max_window_layers": shape.layers,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": min(151643, shape.vocab - 1),  # Qwen2.5's <|endoftext|>, inside tiny vocabs
        "eos_token_id": min(151643, shape.vocab - 1),
        "dtype": "bfloat16",
        "use_cache": True,
    }


@dataclass(frozen=True)
class SyntheticFamily:
    """Paths of one cached synthetic checkpoint family.

    Attributes:
        reference: the common ancestor (mergekit's ``base_model`` for task-vector methods).
        base: fine-tuned from ``reference``; SCF-RKL's base.
        secondary: fine-tuned from ``base``; SCF-RKL's secondary.
    """

    reference: Path
    base: Path
    secondary: Path


def build_family(
    shape: ModelShape, workdir: Path, seed: int = 0, *, progress: bool = True
) -> SyntheticFamily:
    """Build (or reuse) the synthetic reference/base/secondary checkpoints for a shape.

    Values are bf16: the reference is N(0, 0.02) for matrices and about 1 for norm weights; each
    fine-tune adds a heavy-tailed delta (a product of two normals, scale 1e-3, about 5% of a
    weight), so q and p are close, as with real fine-tunes. Deterministic for a seed. The family is
    built in a temporary sibling and renamed into place, so an interrupted build is never reused.

    Args:
        shape: model dimensions.
        workdir: benchmark work directory; the family lives in ``workdir/models/<shape>-seed<seed>``.
        seed: seed of every random tensor.
        progress: show a progress bar.

    Returns:
        The family's paths.
    """
    root = workdir / "models" / f"{shape.name}-seed{seed}"
    family = SyntheticFamily(root / "reference", root / "base", root / "secondary")
    settings = {"shape": asdict(shape), "seed": seed, "version": 2}
    marker = root / "build.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return family
    building = root.with_name(root.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    writers = {role: _ShardedWriter(building / role, shape.input_shard_bytes) for role in asdict(family)}
    for index, (name, dims) in enumerate(
        tqdm(tensor_layout(shape), desc=f"build {shape.name} inputs", unit="tensor", disable=not progress)
    ):
        reference, base, secondary = _synthetic_tensors(name, dims, seed, index)
        writers["reference"].add(name, reference)
        writers["base"].add(name, base)
        writers["secondary"].add(name, secondary)
    for role, writer in writers.items():
        writer.close()
        (building / role / "config.json").write_text(json.dumps(qwen2_config(shape), indent=2))
    (building / "build.json").write_text(json.dumps(settings))
    shutil.rmtree(root, ignore_errors=True)
    building.rename(root)
    return family


def _synthetic_tensors(
    name: str, dims: tuple[int, ...], seed: int, index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference, base and secondary values of one tensor (bf16), deterministic for (seed, index)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if name.endswith("norm.weight"):
        reference = 1.0 + 0.05 * torch.randn(dims, generator=gen)
    else:
        reference = 0.02 * torch.randn(dims, generator=gen)
    reference = reference.to(torch.bfloat16)
    base = (reference.float() + _finetune_delta(dims, gen)).to(torch.bfloat16)
    secondary = (base.float() + _finetune_delta(dims, gen)).to(torch.bfloat16)
    return reference, base, secondary


def _finetune_delta(dims: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A heavy-tailed fine-tuning-like delta: product of two normals, scale 1e-3 (float32)."""
    delta = torch.randn(dims, generator=gen)
    delta.mul_(torch.randn(dims, generator=gen)).mul_(1e-3)
    return delta


class _ShardedWriter:
    """Writes tensors into safetensors shards of at most ``shard_bytes`` plus an index, fsynced."""

    def __init__(self, out: Path, shard_bytes: int) -> None:
        self.out = out
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0
        out.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out / f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        _fsync(path)
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard, rename shards to HF's ``-of-`` names and write the index."""
        if self.pending:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for k, names in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.out / f"shard-{k:05d}.safetensors").rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _numel(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


# --------------------------------------------------------------------------------------------
# The I/O floor
# --------------------------------------------------------------------------------------------


def io_floor(inputs: Sequence[Path], out: Path, shard_bytes: int, *, progress: bool = True) -> float:
    """Seconds to stream every tensor of ``inputs`` in and write the first input's tensors out.

    Same pattern as a merge (tensor by tensor: read this name from every input, write one tensor,
    sharded output with index, fsync), with no compute: the least any merge of these inputs can take.

    Args:
        inputs: checkpoint directories (sharded, with index); the first one's tensors are written.
        out: output directory (replaced).
        shard_bytes: output shard size in bytes.
        progress: show a progress bar.

    Returns:
        Wall seconds.
    """
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    readers = [_Checkpoint(path) for path in inputs]
    writer = _ShardedWriter(out, shard_bytes)
    names = list(readers[0].weight_map)
    scratch = torch.empty(0, dtype=torch.uint8)
    for name in tqdm(names, desc=f"I/O floor ({len(inputs)} inputs)", unit="tensor", disable=not progress):
        tensors = [reader.get(name) for reader in readers]
        # safe_open maps lazily: copy out the bytes of the inputs that are not written, or their
        # reading would cost nothing here (the written one is read by the write itself).
        for tensor in tensors[1:]:
            data = tensor.reshape(-1).view(torch.uint8)
            if scratch.numel() < data.numel():
                scratch = torch.empty(data.numel(), dtype=torch.uint8)
            scratch[: data.numel()].copy_(data)
        writer.add(name, tensors[0])
        del tensors
    writer.close()
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds


class _Checkpoint:
    """Lazy per-tensor reads from a safetensors checkpoint, sharded or single-file (handles kept open)."""

    def __init__(self, path: Path) -> None:
        if (path / INDEX_NAME).exists():
            self.weight_map: dict[str, str] = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        else:  # a single model.safetensors, as mergekit writes when everything fits in one shard
            with safe_open(str(path / "model.safetensors"), framework="pt") as single:
                self.weight_map = dict.fromkeys(single.keys(), "model.safetensors")
        self.handles = {
            shard: safe_open(str(path / shard), framework="pt", device="cpu")
            for shard in dict.fromkeys(self.weight_map.values())
        }

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.weight_map[name]].get_tensor(name)


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read every file under ``paths`` once, so all timed runs start from the same (warm) cache."""
    for root in paths:
        for file in sorted(root.iterdir()):
            with file.open("rb") as fh:
                while fh.read(64 << 20):
                    pass


# --------------------------------------------------------------------------------------------
# Our merges, each in a fresh subprocess
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One timed merge.

    Attributes:
        wall_s: seconds of the merge call itself (interpreter start and imports excluded).
        peak_rss_bytes: the process's peak resident set size (VmHWM), imports included.
        error: why it failed, or None.
    """

    wall_s: float = float("nan")
    peak_rss_bytes: int = 0
    error: str | None = None
    extra: dict = field(default_factory=dict)


def run_our_merge(
    method: str, family: SyntheticFamily, out: Path, *, device: str, shard_size: str, params: dict
) -> RunResult:
    """Run ``scf.merge.merge`` for one method in a fresh Python process and time it.

    Args:
        method: registry name.
        family: the synthetic inputs.
        out: output directory (removed first, so removal is not timed).
        device: ``auto``, ``cpu`` or ``cuda``.
        shard_size: output shard size, e.g. ``"5GB"``.
        params: method parameters.

    Returns:
        Its timing and peak RSS, or the error it raised.
    """
    from scf.methods.registry import get_method

    takes_reference = get_method(method).needs_reference or get_method(method).optional_reference
    spec = {
        "base": str(family.base),
        "secondary": [str(family.secondary)],
        "reference": str(family.reference) if takes_reference else None,
        "method": method,
        "params": params,
        "device": device,
        "shard_size": shard_size,
    }
    shutil.rmtree(out, ignore_errors=True)
    job = json.dumps({"spec": spec, "out": str(out)})
    return _run_child([sys.executable, str(Path(__file__).resolve()), "--child", job])


def child_main(job_json: str) -> int:
    """Subprocess entry: run one merge, print ``RESULT {json}``. Returns the exit code."""
    job = json.loads(job_json)
    try:
        from scf.merge import merge
        from scf.rss import peak_rss_bytes
        from scf.spec import MergeSpec

        spec = MergeSpec(**job["spec"])
        sampler = _RssSampler()
        start = time.perf_counter()
        report = merge(spec, Path(job["out"]), overwrite=True, progress=True)
        result = RunResult(wall_s=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes())
        result.extra = {"timings": report.get("timings", {}), "totals": report.get("totals", {})}
        result.extra |= sampler.stop()
        if torch.cuda.is_initialized():  # the merge ran on a GPU: its peak of allocated memory
            result.extra["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    except Exception as exc:  # reported in the table; the benchmark goes on with the next method
        result = RunResult(error=f"{type(exc).__name__}: {exc}")
    print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
    return 0 if result.error is None else 1


class _RssSampler:
    """Samples /proc/self/status every 20 ms: peak anonymous memory and peak file-backed RSS.

    getrusage's peak RSS also counts pages of memory-mapped input files (safetensors reads through
    mmap), which the kernel can drop at will; the split tells real allocations from those.
    """

    def __init__(self) -> None:
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                lines = Path("/proc/self/status").read_text().splitlines()
            except OSError:  # not Linux: no split
                return
            for line in lines:
                key, _, value = line.partition(":")
                if key in self.peaks:
                    self.peaks[key] = max(self.peaks[key], int(value.split()[0]) * 1024)

    def stop(self) -> dict:
        """Stop sampling; returns ``{"peak_anon_bytes": ..., "peak_file_bytes": ...}``."""
        self._stop.set()
        self._thread.join()
        return {"peak_anon_bytes": self.peaks["RssAnon"], "peak_file_bytes": self.peaks["RssFile"]}


def _run_child(command: list[str]) -> RunResult:
    """Run a child that prints ``RESULT {json}`` last on stdout; its stderr (progress bars) passes through."""
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return RunResult(**json.loads(line[len(RESULT_PREFIX) :]))
    tail = proc.stdout.strip().splitlines()[-3:]
    return RunResult(error=f"exit code {proc.returncode}, no result; stdout tail: {tail}")


# --------------------------------------------------------------------------------------------
# mergekit, in its own virtualenv
# --------------------------------------------------------------------------------------------


class MergekitUnavailable(Exception):
    """mergekit could not be installed or started; the message says why."""


def ensure_mergekit_venv(venv: Path) -> Path:
    """Create ``venv`` with mergekit installed (once) and return its python.

    torch is installed first, pinned to this interpreter's version (a CPU build from the local
    wheel store here), so that mergekit's unpinned torch requirement never pulls a multi-GB CUDA
    build, and both sides run the same torch.

    Args:
        venv: where the virtualenv lives (reused when mergekit already imports there).

    Returns:
        Path of the venv's python.

    Raises:
        MergekitUnavailable: a step failed; the message carries the command and pip's last lines.
    """
    python = venv / "bin" / "python"
    check = ("import mergekit.merge, importlib.metadata as m; "
             f"assert m.version('mergekit') == '{MERGEKIT_VERSION}'")
    if python.exists() and _succeeds([str(python), "-c", check]):
        return python
    torch_pin = "torch==" + torch.__version__.split("+")[0]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", torch_pin],
        [str(python), "-m", "pip", "install", "--quiet", f"mergekit=={MERGEKIT_VERSION}"],
    ]
    for step in steps:
        print("mergekit setup: " + " ".join(step), file=sys.stderr)
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise MergekitUnavailable(f"`{' '.join(step)}` failed (exit {proc.returncode}):\n{tail}")
    return python


def _succeeds(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


def mergekit_config(method: str, family: SyntheticFamily, params: dict, per_model: Sequence[str]) -> dict:
    """The mergekit YAML config (as a dict) computing our ``method`` on ``family``.

    mergekit computes in float32 (``dtype``) and writes bf16 (``out_dtype``), as our engine does.
    Both our base and our secondary are its ``models``, in that order; its ``base_model`` is our
    base, our reference or nothing (``MERGEKIT_BASE_MODEL``; by default the reference, as for every
    task-vector method).

    Args:
        method: mergekit's method name.
        family: the synthetic inputs.
        params: the benchmark's parameters for the method (a list: one value per model).
        per_model: names in ``params`` that mergekit takes per model.

    Returns:
        The config dict (write it as YAML or JSON; JSON is valid YAML).
    """
    models = []
    for index, path in enumerate((family.base, family.secondary)):
        model_params = {key: value[index] if isinstance(value, list) else value
                        for key, value in params.items() if key in per_model}
        models.append({"model": str(path), "parameters": model_params})
    global_params = {k: v for k, v in params.items() if k not in per_model}
    config: dict = {"merge_method": method, "models": models, "dtype": "float32", "out_dtype": "bfloat16"}
    role = MERGEKIT_BASE_MODEL.get(method, "reference")
    if role is not None:
        config["base_model"] = str(getattr(family, role))
    if global_params:
        config["parameters"] = global_params
    return config


def run_mergekit(
    python: Path, config: dict, out: Path, *, device: str, shard_bytes: int, align_seeds: Path | None = None
) -> RunResult:
    """Run mergekit once in a fresh process of its venv (see ``_mergekit_runner.py``) and time it.

    ``align_seeds`` (a JSON map tensor name -> our per-tensor seed) runs mergekit aligned with us
    where its order is unspecified or its arithmetic differs: stable sorts, float64 reductions, and
    its global RNG seeded per tensor as our generators are (see the runner's ``--align``).
    """
    shutil.rmtree(out, ignore_errors=True)
    config_path = out.with_suffix(".yml")
    config_path.write_text(json.dumps(config, indent=2))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    command = [str(python), str(MERGEKIT_RUNNER), str(config_path), str(out)]
    command += ["--device", "cuda" if cuda else "cpu", "--shard-params", str(shard_bytes // 2)]
    if align_seeds is not None:
        command += ["--align", str(align_seeds)]
    return _run_child(command)


def write_seed_map(family: SyntheticFamily, path: Path, seed: int = 0) -> Path:
    """Our per-tensor seeds (``scf.merge.tensor_seed``) for every tensor of the family, as JSON."""
    from scf.merge import tensor_seed

    names = _Checkpoint(family.base).weight_map
    path.write_text(json.dumps({name: tensor_seed(seed, name) for name in names}))
    return path


# --------------------------------------------------------------------------------------------
# Comparing outputs
# --------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """How far mergekit's output is from ours, over all tensors.

    Attributes:
        max_abs_diff: largest |ours - theirs| over all elements (in float32).
        max_ulp: largest distance in bf16 units in the last place.
        tensors_over_1ulp: tensors with any element more than one bf16 ulp apart (rounding aside).
        frac_elements_differ: share of elements not bit-identical.
        frac_neither: share of mergekit's elements equal to neither base nor secondary.
        missing: tensor names in one output only.
    """

    max_abs_diff: float = 0.0
    max_ulp: int = 0
    tensors_over_1ulp: int = 0
    frac_elements_differ: float = 0.0
    frac_neither: float = 0.0
    missing: list[str] = field(default_factory=list)


def bf16_ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance between two bf16 tensors in units in the last place.

    bf16 is sign-magnitude; mapping each bit pattern to a signed integer that increases with the
    value makes adjacent representable numbers differ by exactly 1 (and +0 equal to -0).

    Args:
        a: bf16 tensor.
        b: bf16 tensor of the same shape.

    Returns:
        int32 tensor of ulp distances.
    """
    return (_bf16_ordinal(a) - _bf16_ordinal(b)).abs()


def _bf16_ordinal(t: torch.Tensor) -> torch.Tensor:
    bits = t.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a tensor, as an integer tensor of the same element size."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def compare_outputs(
    ours: Path, theirs: Path, family: SyntheticFamily | None = None, *, progress: bool = True
) -> Comparison:
    """Compare two merged checkpoints tensor by tensor.

    Args:
        ours: our output directory.
        theirs: mergekit's output directory.
        family: when given, also count mergekit's elements equal to neither base nor secondary.
        progress: show a progress bar.

    Returns:
        The summary.
    """
    a, b = _Checkpoint(ours), _Checkpoint(theirs)
    result = Comparison(missing=sorted(set(a.weight_map) ^ set(b.weight_map)))
    parents = (_Checkpoint(family.base), _Checkpoint(family.secondary)) if family else None
    n_total = n_differ = n_neither = 0
    common = [name for name in a.weight_map if name in b.weight_map]
    for name in tqdm(common, desc="compare with mergekit", unit="tensor", disable=not progress):
        x = a.get(name)
        y = b.get(name).to(x.dtype)
        differ = _bits(x) != _bits(y)  # integer compares: fast, and exactly "not bit-identical"
        n_total += x.numel()
        n_differ += int(differ.count_nonzero())
        if differ.any():  # measure only the differing elements
            xd, yd = x[differ], y[differ]
            result.max_abs_diff = max(result.max_abs_diff, float((xd.float() - yd.float()).abs().max()))
            if x.dtype == torch.bfloat16:
                ulps = int(bf16_ulp_distance(xd, yd).max())
                result.max_ulp = max(result.max_ulp, ulps)
                result.tensors_over_1ulp += ulps > 1
        if parents:
            base, secondary = (_bits(p.get(name)) for p in parents)
            n_neither += int(((_bits(y) != base) & (_bits(y) != secondary)).count_nonzero())
    result.frac_elements_differ = n_differ / max(n_total, 1)
    result.frac_neither = n_neither / max(n_total, 1)
    return result


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class BenchmarkRow:
    """One line of the results table."""

    method: str
    n_inputs: int
    ours: RunResult
    mergekit_method: str | None = None
    mergekit: RunResult | None = None
    comparison: Comparison | None = None


def run_benchmark(args: argparse.Namespace) -> dict:
    """Build the inputs, measure the floor, every method and (optionally) mergekit; print tables.

    Args:
        args: parsed command line (see ``build_parser``).

    Returns:
        Everything measured, as a JSON-ready dict (also written to ``--json`` when given).
    """
    from scf.methods.registry import METHODS
    from scf.spec import parse_size  # the floor's shards are sized exactly as the merge's

    shape = SHAPES[args.shape]
    workdir = Path(args.workdir)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    shard_bytes = parse_size(args.shard_size)
    load_before = os.getloadavg()
    started = dt.datetime.now(dt.UTC)
    family = build_family(shape, workdir, args.seed)
    mergekit_python = _mergekit_python(args)

    inputs2 = [family.base, family.secondary]
    inputs3 = [family.base, family.secondary, family.reference]
    warm_page_cache(inputs3)
    floors = {2: [io_floor(inputs2, workdir / "out" / "floor", shard_bytes)]}
    floors[3] = [io_floor(inputs3, workdir / "out" / "floor", shard_bytes)]

    rows = []
    for method in methods:
        spec = METHODS[method]
        params = BENCH_PARAMS.get(method, {})
        out = workdir / "out" / method
        row = BenchmarkRow(method, 3 if spec.needs_reference else 2, ours=RunResult())
        row.ours = run_our_merge(
            method, family, out, device=args.device, shard_size=args.shard_size, params=params
        )
        if mergekit_python and method in MERGEKIT_EQUIVALENT:
            row.mergekit_method = MERGEKIT_EQUIVALENT[method]
            mk_out = workdir / "out" / f"mergekit-{row.mergekit_method}"
            config = mergekit_config(row.mergekit_method, family, params, spec.per_model_params)
            seeds = write_seed_map(family, workdir / "out" / "seeds.json") if args.mergekit_align else None
            row.mergekit = run_mergekit(mergekit_python, config, mk_out, device=args.device,
                                        shard_bytes=shard_bytes, align_seeds=seeds)
            if row.ours.error is None and row.mergekit.error is None:
                selective = row.mergekit_method in APPROXIMATE_IN_MERGEKIT
                row.comparison = compare_outputs(out, mk_out, family if selective else None)
            if not args.keep_outputs:
                shutil.rmtree(mk_out, ignore_errors=True)
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        tqdm.write(f"done: {_summary(row)}", file=sys.stderr)  # partial results while the run goes on

    floors[2].append(io_floor(inputs2, workdir / "out" / "floor", shard_bytes))
    floors[3].append(io_floor(inputs3, workdir / "out" / "floor", shard_bytes))
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "mergekit_aligned": bool(args.mergekit_align),
        "date": f"{started:%Y-%m-%d, %H:%M}-{dt.datetime.now(dt.UTC):%H:%M} UTC",
        "machine": _machine_line(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "shape": asdict(shape),
        "largest_tensor_fp32_bytes": largest_tensor_fp32_bytes(shape),
        "floors_s": floors,
        "rows": [asdict(row) for row in rows],
    }
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def _summary(row: BenchmarkRow) -> str:
    """One line per finished method, for the log of a long run."""
    line = f"{row.method}: " + (row.ours.error or f"{row.ours.wall_s:.1f} s, {_gb(row.ours.peak_rss_bytes)}")
    if row.mergekit is not None:
        line += f"; mergekit {row.mergekit_method}: " + (row.mergekit.error or f"{row.mergekit.wall_s:.1f} s")
    return line


def _mergekit_python(args: argparse.Namespace) -> Path | None:
    if not args.mergekit:
        return None
    try:
        return ensure_mergekit_venv(Path(args.mergekit_venv))
    except MergekitUnavailable as exc:
        print(f"mergekit comparison skipped: {exc}", file=sys.stderr)
        return None


def _machine_line() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {mem_gib:.0f} GiB RAM, "
        f"{gpu}; torch {torch.__version__} with {torch.get_num_threads()} threads"
    )


def format_report(results: dict) -> str:
    """The results as Markdown: setup lines, the method table and the mergekit table.

    Args:
        results: what ``run_benchmark`` measured.

    Returns:
        Markdown text, ready to paste into RESULTS.md.
    """
    floor = {int(n): min(times) for n, times in results["floors_s"].items()}
    largest = results["largest_tensor_fp32_bytes"]
    load = results["load_average"]
    lines = [
        f"- command: `{results['command']}`",
        f"- date: {results['date']}; machine: {results['machine']}",
        f"- load average (1/5/15 min) before: {_fmt_load(load['before'])}; after: {_fmt_load(load['after'])}",
        f"- largest tensor in float32: {_gb(largest)}",
    ]
    for n, times in sorted(results["floors_s"].items(), key=lambda kv: int(kv[0])):
        runs = ", ".join(f"{t:.2f}" for t in times)
        lines.append(f"- I/O floor, {n} inputs + 1 output: {floor[int(n)]:.2f} s (min of runs: {runs} s)")
    lines += [
        "",
        "| method | inputs | wall s | x I/O floor | peak RSS | RSS / largest fp32 "
        "| peak anon / file-backed | read / compute / write s | peak GPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        ours = row["ours"]
        if ours["error"]:
            failed = f"| {row['method']} | {row['n_inputs']} |" + " - |" * 6
            lines.append(f"{failed} {ours['error'][:120]} |")
            continue
        lines.append(
            f"| {row['method']} | {row['n_inputs']} | {ours['wall_s']:.2f} | "
            f"{ours['wall_s'] / floor[row['n_inputs']]:.2f} | {_gb(ours['peak_rss_bytes'])} | "
            f"{ours['peak_rss_bytes'] / largest:.2f} | {_fmt_rss_split(ours['extra'])} | "
            f"{_fmt_split(ours['extra'].get('timings', {}))} | {_fmt_gpu(ours['extra'])} |"
        )
    mk_rows = [row for row in results["rows"] if row["mergekit"] is not None]
    if mk_rows:
        lines += ["", _MERGEKIT_HEADER, "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_format_mergekit_row(row, floor) for row in mk_rows]
    return "\n".join(lines)


_MERGEKIT_HEADER = (
    "| ours | mergekit | ours s | mergekit s | mergekit x floor | ours / mergekit | mergekit peak RSS "
    "| max abs diff | max bf16 ulp | tensors > 1 ulp | elements differing |"
)


def _format_mergekit_row(row: dict, floor: dict[int, float]) -> str:
    ours, mk, cmp = row["ours"], row["mergekit"], row["comparison"]
    if mk["error"]:
        return f"| {row['method']} | {row['mergekit_method']} | failed: {mk['error'][:150]} |"
    ratio = f"{ours['wall_s'] / mk['wall_s']:.2f}" if not ours["error"] else "-"
    mk_floor = floor[row["n_inputs"]]  # mergekit reads the same inputs as our method
    head = (
        f"| {row['method']} | {row['mergekit_method']} | {ours['wall_s']:.2f} | {mk['wall_s']:.2f} | "
        f"{mk['wall_s'] / mk_floor:.2f} | {ratio} | {_gb(mk['peak_rss_bytes'])} |"
    )
    if cmp is None:
        return head + " - | - | - | - |"
    differ = f"{100 * cmp['frac_elements_differ']:.4f}%"
    if row["mergekit_method"] in APPROXIMATE_IN_MERGEKIT:
        differ += f" (mergekit: {100 * cmp['frac_neither']:.3f}% equal to neither parent)"
    if cmp["missing"]:
        differ += f"; in one output only: {cmp['missing'][:3]}"
    return head + f" {cmp['max_abs_diff']:.3g} | {cmp['max_ulp']} | {cmp['tensors_over_1ulp']} | {differ} |"


def _fmt_rss_split(extra: dict) -> str:
    if not extra.get("peak_anon_bytes"):
        return "-"
    return f"{_gb(extra['peak_anon_bytes'])} / {_gb(extra['peak_file_bytes'])}"


def _fmt_gpu(extra: dict) -> str:
    """Peak GPU memory allocated by torch in the merge process (`-` for a CPU merge)."""
    return _gb(extra["peak_gpu_bytes"]) if "peak_gpu_bytes" in extra else "-"


def _fmt_split(timings: dict) -> str:
    """The engine's own read / compute / write seconds from its merge report, when it gives them."""
    keys = ("read_seconds", "compute_seconds", "write_seconds")
    if not all(isinstance(timings.get(k), int | float) for k in keys):
        return "-"
    return " / ".join(f"{timings[k]:.1f}" for k in keys)


def _fmt_load(load: Sequence[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def build_parser() -> argparse.ArgumentParser:
    """The command line of the benchmark."""
    parser = argparse.ArgumentParser(
        description="Merge throughput: each method's wall time over the I/O floor, and peak RSS.",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b", help="model shape")
    parser.add_argument("--methods", default="", help="comma-separated methods (default: all registered)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="merge device")
    parser.add_argument("--shard-size", default="5GB", help="output shard size, as `scf merge --shard-size`")
    parser.add_argument("--workdir", default="/tmp/scf-bench", help="where inputs are cached and outputs go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    parser.add_argument("--mergekit", action="store_true", help="also run mergekit and compare")
    parser.add_argument("--mergekit-venv", default=str(DEFAULT_MERGEKIT_VENV), help="mergekit's virtualenv")
    parser.add_argument("--mergekit-align", action="store_true",
                        help="run mergekit aligned with us (stable sorts, float64 reductions, its RNG seeded "
                             "per tensor as ours): what differs then is a real difference")
    parser.add_argument("--keep-outputs", action="store_true", help="keep merged outputs in the workdir")
    parser.add_argument("--json", default="", help="also write the measurements to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one merge in a fresh process
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(args.child)
    run_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
