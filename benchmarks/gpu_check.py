"""The GPU check: what a first GPU machine must show before real nights run on it.

Every measured step runs in a child process (the merge benchmark, `scf`'s engine through
`merge_throughput.py`, `python -m evals`, or this script's own `--child` modes), and after each
one a separate short-lived probe reads the GPU's used memory, which must be back at its starting
value: a child that exits must give back every byte. This process itself never touches CUDA.

Steps, for `--device cuda` (the same code runs CPU-vs-CPU with `--device cpu`, for the smoke test):

1. the toy zoo, built on the CPU (`python -m evals zoo build`, deterministic), unless `--zoo` names
   one already built;
2. the merge benchmark (`merge_throughput.py --device D`) for scf_rkl and two baselines: wall time
   over the I/O floor and peak GPU memory per method;
3. bit identity: every registered method merges a small synthetic pair on the CPU and on the
   device, and the outputs must be bit-identical (for scf_rkl also the mask: which elements come
   from the secondary). Methods that draw random numbers (found by changing the seed on the CPU)
   use the device's own RNG, whose stream differs from the CPU's: for them the check is that two
   device runs are bit-identical;
4. greedy generation of a zoo model with the transformers backend (float32) on the CPU and on the
   device: the token ids must be equal.

It prints one summary table and writes it to OUT/gpu_check.md (and OUT/gpu_check.json); the exit
code is 0 when every check passes. benchmarks/gpu_check.sh is the entry point on a GPU machine.

Usage:
    python benchmarks/gpu_check.py --device cuda --out /tmp/gpu-check
    python benchmarks/gpu_check.py --device cpu --shape tiny --zoo ZOO --out /tmp/gpu-check   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULT_PREFIX = "RESULT "  # children print their result as the last stdout line: RESULT {json}
BENCH_METHODS = "scf_rkl,linear,ties"  # scf_rkl and two baselines (one dense, one sparsifying)
GPU_MEMORY_TOLERANCE_MIB = 16  # what the driver's own bookkeeping may move between two idle reads


@dataclass
class Check:
    """One line of the summary.

    Attributes:
        step: what was checked.
        result: "PASS", "FAIL" or "INFO" (a measurement with no pass/fail).
        detail: the numbers behind the result.
        gpu_mib_after: GPU memory used after the step's child exited (None: no GPU probed).
    """

    step: str
    result: str
    detail: str
    gpu_mib_after: int | None = None


# --------------------------------------------------------------------------------------------
# GPU memory, read from outside: nvidia-smi, else a short-lived torch process
# --------------------------------------------------------------------------------------------


def gpu_memory_used_mib(device: str) -> int | None:
    """GPU memory in use now (MiB), read by a separate short-lived process; None for `device` cpu.

    nvidia-smi when it is there (it holds no CUDA context); otherwise a fresh Python asks
    torch.cuda.mem_get_info, whose own context is then counted in every reading alike.

    Args:
        device: "cpu" or "cuda".

    Returns:
        MiB used on the first visible GPU, or None.
    """
    if device == "cpu":
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", visible]
        out = subprocess.run(query, capture_output=True, text=True, check=True).stdout
        return int(out.strip().splitlines()[0])
    probe = "import torch; free, total = torch.cuda.mem_get_info(); print((total - free) >> 20)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return int(out.strip())


# --------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------


def run_child(command: list[str], log: Path, *, env: dict | None = None, timeout: float = 600) -> dict:
    """Run a child, its output to `log`; returns its `RESULT {json}` line (or {} when it prints none).

    Raises:
        RuntimeError: the child failed; the message carries the last lines of its log.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        proc = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=sink, text=True, env=env, timeout=timeout
        )
    log.write_text(log.read_text() + proc.stdout)
    result = {}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            break
    if proc.returncode != 0:
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        raise RuntimeError(f"`{' '.join(command[:4])} ...` exited {proc.returncode}: {tail}")
    return result


def _this(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def child_merge_all(job: dict) -> dict:
    """Child: merge the pair with every method on one device; `seeds` x `repeat` outputs each."""
    from scf.merge import merge
    from scf.methods.registry import METHODS
    from scf.spec import MergeSpec

    out, errors = Path(job["out"]), {}
    for method in job["methods"]:
        spec = METHODS[method]
        for seed in job["seeds"]:
            for run in range(job["repeat"]):
                merge_spec = MergeSpec(
                    base=job["base"],
                    secondary=[job["secondary"]],
                    reference=job["reference"] if spec.needs_reference else None,
                    method=method,
                    params=job["params"].get(method, {}),
                    device=job["device"],
                    seed=seed,
                )
                try:
                    merge(merge_spec, out / output_name(method, seed, run), overwrite=True, progress=False)
                except Exception as err:  # reported per method in the summary
                    errors[method] = f"{type(err).__name__}: {err}"
    return {"errors": errors, **_peak_gpu()}


def child_generate(job: dict) -> dict:
    """Child: greedy generations of the toy prompts with the transformers backend on one device."""
    from evals import toytasks
    from evals.backends import load_backend
    from evals.spec import GenParams

    backend = load_backend("transformers", job["model"], device=job["device"], dtype="float32")
    prompts = [
        example.prompt
        for task in ("math", "strings", "safety")
        for example in toytasks.test_set(task, 0)[: job["prompts_per_task"]]
    ]
    params = GenParams(max_new_tokens=toytasks.MAX_NEW_TOKENS, batch_size=8)
    generations = backend.generate(prompts, params)
    rows = [{"prompt": p, **asdict(g)} for p, g in zip(prompts, generations, strict=True)]
    Path(job["out"]).write_text(json.dumps(rows, indent=1))
    return _peak_gpu()


def _peak_gpu() -> dict:
    import torch

    return {"peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None}


def output_name(method: str, seed: int, run: int) -> str:
    """The directory of one merge output of `child_merge_all`."""
    return f"{method}-seed{seed}-run{run}"


# --------------------------------------------------------------------------------------------
# Comparisons (CPU only, in this process)
# --------------------------------------------------------------------------------------------


def _merge_throughput():
    """benchmarks/merge_throughput.py as a module (its family builder and output comparison)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_throughput", HERE / "merge_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their module while being created
    spec.loader.exec_module(module)
    return module


def bit_identical(a: Path, b: Path) -> bool:
    """Whether two merged checkpoints hold the same tensor names with bit-identical values."""
    comparison = _merge_throughput().compare_outputs(a, b, progress=False)
    return not comparison.missing and comparison.frac_elements_differ == 0.0


def mask_difference(base: Path, a: Path, b: Path) -> tuple[int, int]:
    """Elements whose "taken from the secondary" flag differs between outputs `a` and `b`.

    The flag of an element is that its value is not bit-identical to the base's (for SCF-RKL's
    discrete composition: the mask).

    Returns:
        (elements flagged differently, elements in all).
    """
    mt = _merge_throughput()
    base_ckpt, a_ckpt, b_ckpt = mt._Checkpoint(base), mt._Checkpoint(a), mt._Checkpoint(b)
    differ = total = 0
    for name in base_ckpt.weight_map:
        reference = mt._bits(base_ckpt.get(name))
        mask_a = mt._bits(a_ckpt.get(name)) != reference
        mask_b = mt._bits(b_ckpt.get(name)) != reference
        differ += int((mask_a != mask_b).sum())
        total += reference.numel()
    return differ, total


def compare_generations(a: Path, b: Path) -> tuple[int, int]:
    """(prompts whose generated token ids are equal, prompts) between two `child_generate` files."""
    rows_a, rows_b = json.loads(a.read_text()), json.loads(b.read_text())
    if [r["prompt"] for r in rows_a] != [r["prompt"] for r in rows_b]:
        return 0, len(rows_a)
    pairs = zip(rows_a, rows_b, strict=True)
    same = sum(x["token_ids"] == y["token_ids"] and x["text"] == y["text"] for x, y in pairs)
    return same, len(rows_a)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class Run:
    """The checks of one run, and the GPU memory reading after each child step."""

    def __init__(self, device: str, work: Path) -> None:
        self.device = device
        self.work = work
        self.checks: list[Check] = []
        self.zoo: Path | None = None  # set by the zoo step
        self.start_mib = gpu_memory_used_mib(device)
        self.memory_steps: list[tuple[str, int | None]] = []
        self.child_seconds: dict[str, float] = {}

    def child(self, label: str, command: list[str], *, env: dict | None = None) -> dict:
        """Run one child step, then read the GPU memory it left behind."""
        started = time.perf_counter()
        try:
            return run_child(command, self.work / "logs" / f"{label}.log", env=env)
        finally:
            self.child_seconds[label] = time.perf_counter() - started
            self.memory_steps.append((label, gpu_memory_used_mib(self.device)))

    def add(self, step: str, result: str, detail: str) -> None:
        after = self.memory_steps[-1][1] if self.memory_steps else None
        self.checks.append(Check(step, result, detail, after))


def run_checks(args: argparse.Namespace) -> list[Check]:
    """Every step of the check; a step that fails is recorded and the others still run.

    Args:
        args: parsed command line.

    Returns:
        The summary lines.
    """
    from scf.methods.registry import METHODS

    work = Path(args.out) / "work"
    work.mkdir(parents=True, exist_ok=True)
    run = Run(args.device, work)
    started = time.perf_counter()
    identity_methods = [m for m in args.identity_methods.split(",") if m] or list(METHODS)
    steps = [
        ("toy zoo", lambda: _zoo_step(run, args)),
        ("merge benchmark", lambda: _benchmark_step(run, args)),
        ("merge bit identity", lambda: _identity_step(run, args, identity_methods)),
        ("greedy generation", lambda: _generation_step(run, args)),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as err:  # one broken step must not hide the others' results
            run.add(name, "FAIL", f"{type(err).__name__}: {err}"[:400])
    _memory_summary(run)
    children = ", ".join(f"{label} {seconds:.0f}" for label, seconds in run.child_seconds.items())
    run.checks.append(
        Check("wall time", "INFO", f"{time.perf_counter() - started:.0f} s (children, s: {children})")
    )
    return run.checks


def _zoo_step(run: Run, args: argparse.Namespace) -> None:
    if args.zoo:
        run.zoo = Path(args.zoo).resolve()
        run.add("toy zoo", "INFO", f"given: {run.zoo}")
        return
    run.zoo = run.work / "zoo"
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}  # built on the CPU: deterministic, as everywhere
    command = [sys.executable, "-m", "evals", "zoo", "build", "--out", str(run.zoo), "--no-progress"]
    run.child("zoo-build", command, env=env)
    run.add("toy zoo", "INFO", f"built on the CPU: {run.zoo}")


def _benchmark_step(run: Run, args: argparse.Namespace) -> None:
    results = run.work / "merge_throughput.json"
    command = [sys.executable, str(HERE / "merge_throughput.py"), "--shape", args.shape]
    command += ["--methods", args.bench_methods, "--device", args.device]
    command += ["--workdir", str(run.work / "bench"), "--json", str(results)]
    run.child("merge-benchmark", command)
    data = json.loads(results.read_text())
    floor = {int(n): min(times) for n, times in data["floors_s"].items()}
    for row in data["rows"]:
        ours = row["ours"]
        if ours["error"]:
            run.add(f"benchmark {row['method']}", "FAIL", ours["error"][:300])
            continue
        gpu = ours["extra"].get("peak_gpu_bytes")
        ratio = ours["wall_s"] / floor[row["n_inputs"]]
        peak_gpu = "-" if gpu is None else f"{gpu / 2**30:.2f} GiB"
        detail = f"{args.shape}: {ours['wall_s']:.2f} s = {ratio:.2f}x the I/O floor; peak GPU {peak_gpu}; "
        run.add(
            f"benchmark {row['method']}",
            "INFO",
            detail + f"peak RSS {ours['peak_rss_bytes'] / 2**30:.2f} GiB",
        )


def _identity_step(run: Run, args: argparse.Namespace, methods: list[str]) -> None:
    mt = _merge_throughput()
    family = mt.build_family(mt.SHAPES["tiny"], run.work / "identity", seed=0, progress=False)
    pair = {"base": str(family.base), "secondary": str(family.secondary), "reference": str(family.reference)}
    pair["params"] = mt.BENCH_PARAMS  # the benchmark's parameters: DARE really drops (density 0.5)
    # Separate folders even when the device under test is the CPU (the smoke test): never one
    # output compared with itself.
    outs = {
        "cpu": run.work / "identity" / "reference-cpu",
        "device": run.work / "identity" / f"tested-{args.device}",
    }
    jobs = {
        "cpu": {
            **pair,
            "device": "cpu",
            "methods": methods,
            "seeds": [0, 1],
            "repeat": 1,
            "out": str(outs["cpu"]),
        },
        "device": {
            **pair,
            "device": args.device,
            "methods": methods,
            "seeds": [0],
            "repeat": 2,
            "out": str(outs["device"]),
        },
    }
    errors = {}
    for folder in outs.values():
        shutil.rmtree(folder, ignore_errors=True)  # nothing left from an earlier run is compared
    for key, job in jobs.items():
        label = f"merge-all-{'reference' if key == 'cpu' else 'tested'}-{job['device']}"
        result = run.child(label, _this("--child", "merge-all", json.dumps(job)))
        errors.update(result.get("errors", {}))
    for method in methods:
        if method in errors:
            run.add(f"identity {method}", "FAIL", errors[method][:300])
            continue
        run.add(
            f"identity {method}",
            *_identity_result(method, family.base, outs["cpu"], outs["device"], args.device),
        )


def _identity_result(method: str, base: Path, cpu: Path, device: Path, device_name: str) -> tuple[str, str]:
    seeded = not bit_identical(cpu / output_name(method, 0, 0), cpu / output_name(method, 1, 0))
    on_device = device / output_name(method, 0, 0)
    reproducible = bit_identical(on_device, device / output_name(method, 0, 1))
    same = bit_identical(cpu / output_name(method, 0, 0), on_device)
    detail = f"{device_name} vs cpu: {'bit-identical' if same else 'DIFFERENT'}; {device_name} twice: " + (
        "bit-identical" if reproducible else "DIFFERENT"
    )
    if method in ("scf_rkl", "scf_kl"):
        differ, total = mask_difference(base, cpu / output_name(method, 0, 0), on_device)
        detail += f"; mask: {differ} of {total} elements differ"
        same = same and differ == 0
    if seeded:  # draws random numbers: the device's generator is not the CPU's
        detail += "; seeded method (output changes with the seed): the device RNG may differ from the CPU's"
        return ("PASS" if reproducible else "FAIL"), detail
    return ("PASS" if same and reproducible else "FAIL"), detail


def _generation_step(run: Run, args: argparse.Namespace) -> None:
    if run.zoo is None:
        raise RuntimeError("no toy zoo (its step failed)")
    files = []
    for role, device in (("reference", "cpu"), ("tested", args.device)):
        files.append(run.work / f"generations-{role}-{device}.json")
        files[-1].unlink(missing_ok=True)
        job = {"model": str(run.zoo / "math"), "device": device, "out": str(files[-1])}
        job["prompts_per_task"] = args.prompts_per_task
        run.child(f"generate-{role}-{device}", _this("--child", "generate", json.dumps(job)))
    same, total = compare_generations(*files)
    result = "PASS" if same == total and total > 0 else "FAIL"
    run.add(
        "greedy generation",
        result,
        f"zoo math, float32: {same} of {total} prompts with equal token ids ({args.device} vs cpu)",
    )


def _memory_summary(run: Run) -> None:
    if run.start_mib is None:
        run.checks.append(Check("GPU memory after each child", "INFO", f"not probed (--device {run.device})"))
        return
    bad = [
        (label, mib) for label, mib in run.memory_steps if abs(mib - run.start_mib) > GPU_MEMORY_TOLERANCE_MIB
    ]
    detail = f"start {run.start_mib} MiB; after " + ", ".join(
        f"{label} {mib}" for label, mib in run.memory_steps
    )
    run.checks.append(Check("GPU memory back to start after each child", "FAIL" if bad else "PASS", detail))


def format_summary(checks: Sequence[Check], header: str) -> str:
    """The summary as one Markdown table.

    Args:
        checks: the summary lines.
        header: a line saying what ran where.

    Returns:
        Markdown text.
    """
    lines = [header, "", "| step | result | detail | GPU MiB after |", "|---|---|---|---|"]
    for check in checks:
        after = "-" if check.gpu_mib_after is None else str(check.gpu_mib_after)
        lines.append(f"| {check.step} | {check.result} | {check.detail} | {after} |")
    return "\n".join(lines)


def _header(args: argparse.Namespace) -> str:
    import platform

    gpu = "no GPU probed"
    if args.device != "cpu" and shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        gpu = subprocess.run(query, capture_output=True, text=True).stdout.strip().splitlines()[0]
    return (
        f"GPU check, --device {args.device}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()}; {gpu}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="GPU check: merges, bit identity, generation, memory release."
    )
    parser.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="device under test (cpu: smoke)"
    )
    parser.add_argument("--out", default="gpu-check", help="writes gpu_check.md, gpu_check.json and work/")
    parser.add_argument(
        "--shape", default="qwen2.5-1.5b", help="merge benchmark shape (merge_throughput --shape)"
    )
    parser.add_argument("--bench-methods", default=BENCH_METHODS, help="merge benchmark methods")
    parser.add_argument("--zoo", help="an already built toy zoo (default: build one on the CPU)")
    parser.add_argument(
        "--identity-methods", default="", help="methods of the bit-identity check (default: all)"
    )
    parser.add_argument("--prompts-per-task", type=int, default=8, help="generation prompts per toy task")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns 0 when every check passes."""
    args = build_parser().parse_args(argv)
    if args.child:
        kind, job = args.child
        result = {"merge-all": child_merge_all, "generate": child_generate}[kind](json.loads(job))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    if args.device == "cuda":
        try:
            gpu_memory_used_mib("cuda")
        except (subprocess.CalledProcessError, ValueError, IndexError) as err:
            print(f"error: --device cuda but no GPU can be read here ({type(err).__name__})", file=sys.stderr)
            return 2
    checks = run_checks(args)
    summary = format_summary(checks, _header(args))
    print(summary)
    out = Path(args.out)
    (out / "gpu_check.md").write_text(summary + "\n")
    (out / "gpu_check.json").write_text(json.dumps([asdict(c) for c in checks], indent=2))
    return 0 if all(check.result != "FAIL" for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
