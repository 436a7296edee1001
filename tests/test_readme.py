"""The README's promises point at real things: every test its Guarantees section names exists."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_guarantee_names_tests_that_exist() -> None:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Guarantees"): text.index("## Development")]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(lines) >= 15
    for line in lines:
        refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", line)
        assert refs, f"a guarantee without its test: {line}"
        for path, name in refs:
            assert (REPO / path).is_file(), path
            if name:
                tree = ast.parse((REPO / path).read_text())
                names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
                assert name in names, f"{path} has no test {name}"


def test_the_screenshot_script_is_executable_and_the_readme_shows_its_pictures() -> None:
    script = REPO / "scripts" / "screenshots.sh"
    text = (REPO / "README.md").read_text()

    assert script.is_file() and os.access(script, os.X_OK)
    assert "`scripts/screenshots.sh`" in text
    pictures = re.findall(r"!\[[^\]]+\]\((docs/screenshots/[\w-]+\.png)\)", text)
    assert pictures == ["docs/screenshots/prefect-run-form.png", "docs/screenshots/prefect-night-graph.png",
                        "docs/screenshots/mlflow-runs-compared.png"]
    for picture in pictures:
        assert picture.removeprefix("docs/screenshots/").removesuffix(".png") in script.read_text()
        assert 10_000 < (REPO / picture).stat().st_size < 500_000, picture  # committed, and small
