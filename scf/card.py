"""The merge output's ``README.md``: a model card in the Hugging Face Hub's format.

YAML front matter (``base_model``: every input; ``library_name: transformers``; ``tags``; ``license``
only where every input's own card declares the same one), then the method and its paper, the
parameters, the inputs with their revisions and fingerprints, where the parameters come from, the
vocabulary and file decisions, and the report's warnings (e.g. from a mergekit config). Built from
the merge report alone (plus the inputs' cards for the license), so it says nothing the report does not.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from scf.errors import ScfError
from scf.methods.registry import METHODS
from scf.sources import split_hub_ref
from scf.yamlsafe import load_yaml

CARD_NAME = "README.md"
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_MAX_CARD_BYTES = 1_000_000  # an input's README is read only for its front matter
_SCF_PAPER = ("Beyond Parameter Arithmetic: Sparse Complementary Fusion for Distribution-Aware Model "
              "Merging (Lin et al., 2026)")
_PAPER_TITLES = {"scf_rkl": _SCF_PAPER, "scf_kl": _SCF_PAPER + ", the forward-KL ablation"}
_ARXIV_TITLES = {  # the registry's reference_url -> the paper's title, for the card's link text
    "https://arxiv.org/abs/2203.05482": "Model soups (Wortsman et al., 2022)",
    "https://arxiv.org/abs/2212.04089": "Editing Models with Task Arithmetic (Ilharco et al., 2022)",
    "https://arxiv.org/abs/2306.01708": "TIES-Merging (Yadav et al., 2023)",
    "https://arxiv.org/abs/2311.03099": "Language Models are Super Mario (DARE; Yu et al., 2023)",
    "https://arxiv.org/abs/2312.06795": "Model Breadcrumbs (Davari and Belilovsky, 2023)",
    "https://arxiv.org/abs/2403.19522": "Model Stock (Jang et al., 2024)",
    "https://arxiv.org/abs/2406.11617": "DELLA-Merging (Deep et al., 2024)",
    "https://arxiv.org/abs/2408.07990": "FuseChat / SCE (Wan et al., 2024)",
}


def front_matter(path: Path) -> dict[str, Any] | None:
    """The YAML front matter of a model card, or None when it has none (or it is not a mapping).

    Args:
        path: a ``README.md``.

    Returns:
        The mapping; None also for a missing, unreadable or malformed card (a card never fails a merge).
    """
    try:
        with path.open("rb") as f:
            text = f.read(_MAX_CARD_BYTES).decode("utf-8")
        match = _FRONT_MATTER.match(text)
        data = load_yaml(match.group(1), str(path)) if match else None
    except (OSError, UnicodeDecodeError, ScfError):
        return None
    return data if isinstance(data, dict) else None


def shared_license(directories: list[Path | None]) -> str | None:
    """The license every input's card declares, or None unless all declare one and the same.

    Args:
        directories: each input's directory (None for a lone ``.safetensors`` file: no card).

    Returns:
        The license id (e.g. ``apache-2.0``) or None.
    """
    licenses = set()
    for directory in directories:
        card = front_matter(directory / CARD_NAME) if directory is not None else None
        value = (card or {}).get("license")
        if not isinstance(value, str) or not value.strip():
            return None
        licenses.add(value.strip())
    return licenses.pop() if len(licenses) == 1 else None


def _inputs(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(role, {ref, revision, fingerprint})`` of every input, base first."""
    inputs = report["inputs"]
    rows = [("base", inputs["base"])]
    rows += [(f"secondary[{i}]", s) for i, s in enumerate(inputs["secondaries"])]
    return rows + ([("reference", inputs["reference"])] if inputs.get("reference") else [])


def _model_id(entry: dict[str, Any]) -> str:
    """The Hub id of a hub input (its revision goes to the inputs table), or the path as written."""
    return split_hub_ref(entry["ref"])[0] if entry.get("revision") else entry["ref"]


def card_front_matter(report: dict[str, Any], license_id: str | None) -> dict[str, Any]:
    """The card's front matter as a mapping (see the module docstring)."""
    base_models = list(dict.fromkeys(_model_id(entry) for _, entry in _inputs(report)))
    data: dict[str, Any] = {"base_model": base_models, "library_name": "transformers",
                            "tags": ["merge", "scf-pipeline", report["method"]]}
    if license_id is not None:
        data["license"] = license_id
    return data


def model_card(report: dict[str, Any], title: str, license_id: str | None) -> str:
    """The model card's text.

    Args:
        report: the merge report (`scf.merge.merge`'s), with ``files_from``.
        title: the card's heading (the output directory's name).
        license_id: the shared license of the inputs (`shared_license`), or None.

    Returns:
        Markdown with YAML front matter.
    """
    front = yaml.safe_dump(card_front_matter(report, license_id), sort_keys=False, allow_unicode=True)
    parts = [f"---\n{front}---\n", f"# {title}\n",
             f"A merge of {len(_inputs(report))} models made with scf-pipeline {report['scf_version']} "
             f"using `{report['method']}`.\n",
             _method_section(report), _params_section(report), _inputs_section(report),
             _sources_section(report)]
    if "vocabulary" in report:
        parts.append(_vocab_section(report["vocabulary"]))
    parts.append(_files_section(report.get("files_from") or {}))
    if report.get("warnings"):
        parts.append(_warnings_section(report["warnings"]))
    return "\n".join(parts)


def _method_section(report: dict[str, Any]) -> str:
    method = METHODS.get(report["method"])
    if method is None:
        return f"## Merge method\n\n`{report['method']}`\n"
    title = _PAPER_TITLES.get(method.name) or _ARXIV_TITLES.get(method.reference_url, "reference")
    return (f"## Merge method\n\n`{method.name}`: {method.summary}\n\n"
            f"Paper: [{title}]({method.reference_url})\n")


def _params_section(report: dict[str, Any]) -> str:
    settings = {"method": report["method"], "params": report["params"], "dtype": report["dtype"],
                "seed": report["seed"]}
    if "vocabulary" in report and report["vocabulary"]["tokenizer_source"] is not None:
        settings["tokenizer_source"] = report["vocabulary"]["tokenizer_source"]
    text = yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)
    return f"## Parameters\n\n```yaml\n{text}```\n\nThe full spec: `merge_config.yaml`.\n"


def _inputs_section(report: dict[str, Any]) -> str:
    lines = ["## Inputs\n", "| Role | Model | Revision | Fingerprint |", "|---|---|---|---|"]
    for role, entry in _inputs(report):
        revision = f"`{entry['revision']}`" if entry.get("revision") else "(local)"
        lines.append(f"| {role} | `{_model_id(entry)}` | {revision} | `{entry['fingerprint'][:16]}` |")
    return "\n".join(lines) + "\n"


def _sources_section(report: dict[str, Any]) -> str:
    diagnostics = report.get("diagnostics") or {}
    shares = diagnostics.get("fraction_from") or report["totals"]["fraction_from"]
    n_secondaries = len(report["inputs"]["secondaries"])
    names = {"base": "base"} | {f"secondary_{i}": f"secondary[{i}]" for i in range(n_secondaries)}
    lines = ["## Where the parameters come from\n",
             "Share of all parameters whose value is bit-identical to each input's (the first that matches), "
             "or to none of them:\n", "| Source | Share |", "|---|---|"]
    lines += [f"| {names.get(key, key)} | {share:.2%} |" for key, share in shares.items()]
    layers = diagnostics.get("per_layer_sparsity")
    if layers:
        lines += ["", "Share left at the base's value, per layer:", "", "| Layer | Base share |", "|---|---|"]
        lines += [f"| {layer} | {share:.2%} |" for layer, share in layers.items()]
    return "\n".join(lines) + "\n"


def _vocab_section(vocab: dict[str, Any]) -> str:
    lines = ["## Vocabulary\n"]
    if vocab["tokenizer_source"] is not None:
        lines.append(f"`tokenizer_source: {vocab['tokenizer_source']}`: the tokenizer is "
                     f"{vocab['source']}'s. Embedding and LM head rows that every input has are merged; "
                     "the others are copied.\n")
        lines += ["| Tensor | Rows | Merged | Copied | Copied from |", "|---|---|---|---|---|"]
        for name, entry in vocab["tensors"].items():
            lines.append(f"| `{name}` | {entry['rows']} | {entry['rows_merged']} | {entry['rows_copied']} | "
                         f"{entry['copied_from'] or '-'} |")
    if vocab["untied"]:
        untied = ", ".join(vocab["untied"])
        lines.append(f"\nTied embeddings untied (their embedding used as LM head): {untied}.")
    return "\n".join(lines) + "\n"


def _files_section(files: dict[str, Any]) -> str:
    template = files.get("chat_template")
    rows = [("config.json", files.get("config")), ("tokenizer", files.get("tokenizer")),
            ("generation_config.json", files.get("generation_config")),
            ("chat template", f"{template['from']} ({template['file']})" if template else None)]
    lines = ["## Files\n", "| File | From |", "|---|---|"]
    lines += [f"| {name} | {origin or 'none'} |" for name, origin in rows]
    return "\n".join(lines) + "\n"


def _warnings_section(warnings: list[str]) -> str:
    return "\n".join(["## Warnings\n", *(f"- {warning}" for warning in warnings)]) + "\n"
