"""Our use of vLLM's API exists in vLLM, checked without a GPU.

Every keyword `evals.backends.vllm` passes (`VLLM_KEYWORDS`: to `LLM`, `LLM.generate`,
`SamplingParams`, the keys of a `TokensPrompt`) and every attribute it reads (`VLLM_ATTRIBUTES`)
must be defined by vLLM. `LLM` hands unknown keywords on to `EngineArgs` (**kwargs), so its
accepted names are its own parameters plus EngineArgs' fields.

Where vLLM's code comes from, in order:
1. the installed `vllm` package, when it imports (each class's source, via `inspect`);
2. else the wheel named by $SCF_VLLM_WHEEL (e.g. from `pip download --no-deps vllm==0.33.0`), whose
   sources are parsed with `ast` and never imported;
3. else the test is skipped, saying so.

Both read the same thing: the class definitions, analysed with `ast` (parameters of `__init__` or
of a method, class-level annotated fields of dataclasses / msgspec structs / TypedDicts, methods,
and attributes assigned as `self.x = ...`), following base classes by name.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import sys
import zipfile
from pathlib import Path

import pytest

from evals.backends.vllm import VLLM_ATTRIBUTES, VLLM_KEYWORDS

WHEEL_ENV = "SCF_VLLM_WHEEL"
_NOT_VLLM = {"object", "TypedDict", "Generic", "Struct", "ABC", "Protocol"}  # bases from elsewhere
# Where the installed package exposes each class we look at (old homes second).
IMPORT_PATHS = {
    "LLM": ["vllm:LLM"],
    "SamplingParams": ["vllm:SamplingParams"],
    "RequestOutput": ["vllm:RequestOutput"],
    "CompletionOutput": ["vllm:CompletionOutput"],
    "TokensPrompt": ["vllm:TokensPrompt"],
    "EngineArgs": ["vllm:EngineArgs"],
    "Logprob": ["vllm.logprobs:Logprob", "vllm.sequence:Logprob"],
    "ModelConfig": ["vllm.config:ModelConfig"],
}


class Sources:
    """Class definitions of one vLLM version, by class name: `ast.ClassDef` nodes."""

    def __init__(self, classes: dict[str, ast.ClassDef], version: str) -> None:
        self.classes = classes
        self.version = version

    @classmethod
    def from_installed(cls) -> Sources:
        """From the importable vllm (ImportError when there is none): the modules defining our classes."""
        vllm = importlib.import_module("vllm")
        classes: dict[str, ast.ClassDef] = {}
        for paths in IMPORT_PATHS.values():
            obj = _first_importable(paths)
            if obj is None:
                continue
            # The modules of the class and of its bases (mixins elsewhere; a TypedDict's parents,
            # which its __mro__ does not list, sit in its module): every class they define.
            for klass in inspect.getmro(obj):
                if klass.__module__.split(".")[0] == "vllm":
                    module_source = inspect.getsource(sys.modules[klass.__module__])
                    for name, node in _class_defs(module_source).items():
                        classes.setdefault(name, node)
        return cls(classes, getattr(vllm, "__version__", "unknown"))

    @classmethod
    def from_wheel(cls, wheel: Path) -> Sources:
        """From a wheel file: parse the modules that define our classes, then their bases, by name."""
        with zipfile.ZipFile(wheel) as archive:
            texts = {
                member: archive.read(member).decode("utf-8", "replace")
                for member in archive.namelist()
                if member.startswith("vllm/") and member.endswith(".py")
            }
            metadata = [m for m in archive.namelist() if m.endswith(".dist-info/METADATA")]
            version = "unknown"
            if metadata:
                found = re.search(r"^Version: (\S+)", archive.read(metadata[0]).decode(), re.M)
                version = found.group(1) if found else version
        classes: dict[str, ast.ClassDef] = {}
        pending = set(IMPORT_PATHS)
        while pending:
            pattern = re.compile(rf"^class ({'|'.join(sorted(pending))})\b", re.M)
            for text in (t for t in texts.values() if pattern.search(t)):
                for name, node in _class_defs(text).items():
                    if name in pending:
                        classes.setdefault(name, node)
            bases = {base for node in classes.values() for base in _base_names(node)}
            pending = {b for b in bases if b not in classes and b.isidentifier()} - pending - _NOT_VLLM
        return cls(classes, version)

    def members(self, name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        """Attributes instances of class `name` have: fields, methods, `self.x =` targets, bases' too."""
        node = self.classes[name]
        out: set[str] = set()
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                out.add(stmt.target.id)
            elif isinstance(stmt, ast.Assign):
                out |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
            elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                out.add(stmt.name)
                for sub in ast.walk(stmt):
                    targets = sub.targets if isinstance(sub, ast.Assign) else [getattr(sub, "target", None)]
                    for target in targets:
                        if (
                            isinstance(target, ast.Attribute)
                            and isinstance(target.value, ast.Name)
                            and target.value.id == "self"
                        ):
                            out.add(target.attr)
        for base in _base_names(node):
            if base in self.classes and base not in seen:
                out |= self.members(base, seen | {name})
        return out

    def fields(self, name: str) -> set[str]:
        """Class-level annotated fields (dataclass, msgspec.Struct, TypedDict keys), bases included."""
        out = set()
        pending = [name]
        while pending:
            node = self.classes.get(pending.pop())
            if node is None:
                continue
            out |= {
                s.target.id
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            }
            pending += [b for b in _base_names(node) if b not in ("TypedDict", "object")]
        return {f for f in out if not f.startswith("_")}

    def parameters(self, name: str, method: str) -> tuple[set[str], bool]:
        """Keyword-passable parameters of `name.method` and whether it takes **kwargs."""
        node = self._method(name, method)
        if node is None:
            raise LookupError(f"vllm {self.version}: {name}.{method} not found")
        args = node.args
        names = {a.arg for a in args.args + args.kwonlyargs if a.arg != "self"}
        return names, args.kwarg is not None

    def _method(self, name: str, method: str) -> ast.FunctionDef | None:
        node = self.classes.get(name)
        if node is None:
            return None
        for stmt in node.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and stmt.name == method:
                return stmt
        for base in _base_names(node):
            found = self._method(base, method)
            if found is not None:
                return found
        return None

    def accepted_keywords(self, callable_name: str) -> set[str]:
        """The keywords a callable of our table accepts in this vLLM version."""
        if callable_name == "TokensPrompt":
            return self.fields("TokensPrompt")
        if callable_name == "LLM.generate":
            return self.parameters("LLM", "generate")[0]
        if callable_name == "SamplingParams" and self._method("SamplingParams", "__init__") is None:
            return self.fields("SamplingParams")  # a msgspec Struct / dataclass: fields are the keywords
        names, takes_kwargs = self.parameters(callable_name, "__init__")
        if callable_name == "LLM" and takes_kwargs:
            names |= self.fields("EngineArgs")  # LLM(**kwargs) -> EngineArgs(**kwargs)
        return names


def _class_defs(source: str) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}


def _base_names(node: ast.ClassDef) -> list[str]:
    names = []
    for base in node.bases:
        target = base.value if isinstance(base, ast.Subscript) else base  # Generic[...] and the like
        if isinstance(target, ast.Name):
            names.append(target.id)
        elif isinstance(target, ast.Attribute):
            names.append(target.attr)
    return names


def _first_importable(paths: list[str]):
    """The first "module:attribute" of `paths` that imports, or None."""
    for path in paths:
        module_name, attr = path.split(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue
    return None


def problems(sources: Sources) -> list[str]:
    """Every name of our tables that this vLLM does not define, one line each."""
    found = []
    for callable_name, ours in VLLM_KEYWORDS.items():
        missing = ours - sources.accepted_keywords(callable_name)
        if missing:
            found.append(f"{callable_name} does not accept {sorted(missing)}")
    for class_name, ours in VLLM_ATTRIBUTES.items():
        missing = ours - sources.members(class_name)
        if missing:
            found.append(f"{class_name} has no attribute {sorted(missing)}")
    return found


def load_sources() -> Sources:
    """The installed vllm's sources, else the wheel's from $SCF_VLLM_WHEEL; skips when neither."""
    try:
        return Sources.from_installed()
    except Exception as err:  # not installed, or not importable on this machine
        installed_error = f"{type(err).__name__}: {err}"
    wheel = os.environ.get(WHEEL_ENV)
    if not wheel:
        pytest.skip(f"vllm is not importable ({installed_error}) and ${WHEEL_ENV} names no wheel")
    if not Path(wheel).is_file():
        pytest.skip(f"${WHEEL_ENV}={wheel} is not a file")
    return Sources.from_wheel(Path(wheel))


def test_every_keyword_and_attribute_we_use_exists_in_vllm():
    sources = load_sources()
    assert problems(sources) == [], f"vllm {sources.version}"


# A vLLM-shaped package small enough to write here: the checker itself is tested on every run,
# including where no vLLM is available.
MINI_VLLM = {
    "vllm/entrypoints/llm.py": """
class Mixin:
    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        pass

class LLM(Mixin):
    def __init__(self, model, *, tokenizer=None, dtype="auto", seed=0, trust_remote_code=False,
                 tensor_parallel_size=1, gpu_memory_utilization=0.9, enforce_eager=False, **kwargs):
        self.model_config = None
""",
    "vllm/engine/arg_utils.py": """
class EngineArgs:
    model: str = ""
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    load_format: str = "auto"
""",
    "vllm/__init__.py": """
from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.llm import LLM
from vllm.inputs.llm import TokensPrompt
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

__version__ = "9.9.9"
""",
    "vllm/config/__init__.py": "from vllm.config.model import ModelConfig\n",
    "vllm/sampling_params.py": """
class Struct:  # stands in for msgspec.Struct
    pass

class SamplingParams(Struct):
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list | None = None
    stop_token_ids: list | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    _private: int = 0
""",
    "vllm/outputs.py": """
class CompletionOutput:
    text: str
    token_ids: list
    finish_reason: str | None = None

class RequestOutput:
    def __init__(self, request_id, outputs, prompt_logprobs):
        self.outputs = outputs
        self.prompt_logprobs = prompt_logprobs
""",
    "vllm/inputs/llm.py": """
from typing import TypedDict

class _PromptOptions(TypedDict):
    cache_salt: str

class TokensPrompt(_PromptOptions):
    prompt_token_ids: list
""",
    "vllm/logprobs.py": "class Logprob:\n    logprob: float\n",
    "vllm/config/model.py": "class ModelConfig:\n    max_model_len: int = None\n",
}


@pytest.fixture(params=["wheel", "installed"])
def mini_sources(request, tmp_path, monkeypatch) -> Sources:
    """The mini vLLM's sources, read from a wheel file or from an importable package."""
    if request.param == "wheel":
        wheel = tmp_path / "vllm-9.9.9-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for name, source in MINI_VLLM.items():
                archive.writestr(name, source)
            archive.writestr("vllm-9.9.9.dist-info/METADATA", "Name: vllm\nVersion: 9.9.9\n")
        return Sources.from_wheel(wheel)
    for name, source in MINI_VLLM.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    for package in ("vllm/entrypoints", "vllm/engine", "vllm/inputs"):
        (tmp_path / package / "__init__.py").touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, module)
    sources = Sources.from_installed()
    for module in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, module)  # the mini package must not outlive the test
    return sources


def test_the_checker_finds_what_a_vllm_lacks(mini_sources):
    sources = mini_sources
    assert sources.version == "9.9.9"
    # Everything present except SamplingParams' `detokenize` (left out above) ...
    assert problems(sources) == ["SamplingParams does not accept ['detokenize']"]
    # ... and the checker looks where vLLM puts things: LLM's **kwargs go to EngineArgs, generate
    # may come from a mixin, RequestOutput sets its attributes in __init__, TypedDict keys inherit.
    assert {"max_model_len", "max_num_seqs", "load_format"} <= sources.accepted_keywords("LLM")
    assert sources.accepted_keywords("LLM.generate") == {"prompts", "sampling_params", "use_tqdm"}
    assert {"outputs", "prompt_logprobs"} <= sources.members("RequestOutput")
    assert sources.accepted_keywords("TokensPrompt") == {"prompt_token_ids", "cache_salt"}
    assert "_private" not in sources.accepted_keywords("SamplingParams")
