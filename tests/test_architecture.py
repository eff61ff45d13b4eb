"""The layout's rules, as tests: torch stays inside vallexd/inference (and the tools that build
weights), the contract's numbers and lists have one home, and vallexctl starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

#: Packages that may import torch at module level (anything else imports it lazily, if at all).
TORCH_ALLOWED = ("vallexd/inference/", "vallexd/tools/", "bench/")
HEAVY = ("torch", "torchaudio", "vocos", "encodec")


def module_level_imports(source: str) -> list[tuple[int, str]]:
    """(line, top-level module) of every import that runs when the module is imported.

    Imports inside functions run later (lazily) and are not counted; imports under `if` / `try`
    at module level are.
    """
    found: list[tuple[int, str]] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, a.name.split(".")[0]) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((node.lineno, node.module.split(".")[0]))
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []) or []:
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])
    visit(ast.parse(source).body)
    return found


def torch_violations(root: Path) -> list[str]:
    bad = []
    for path in sorted([*root.glob("vallexd/**/*.py"), *root.glob("vallexctl/**/*.py")]):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(TORCH_ALLOWED):
            continue
        for line, module in module_level_imports(path.read_text(encoding="utf-8")):
            if module in HEAVY:
                bad.append(f"{rel}:{line} imports {module}")
    return bad


def test_torch_stays_inside_inference() -> None:
    assert torch_violations(ROOT) == []


def test_boundary_check_catches_a_new_torch_import(tmp_path: Path) -> None:
    """The checker itself: a torch import added to service/requests.py is reported."""
    for rel in ("vallexd/service/requests.py", "vallexd/inference/model.py"):
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((ROOT / rel).read_text(encoding="utf-8"), encoding="utf-8")
    assert torch_violations(tmp_path) == []
    requests = tmp_path / "vallexd/service/requests.py"
    requests.write_text(requests.read_text() + "\ntry:\n    import torch.nn\nexcept ImportError:\n    pass\n")
    line = len(requests.read_text().splitlines()) - 2  # the "import torch.nn" line
    assert torch_violations(tmp_path) == [f"vallexd/service/requests.py:{line} imports torch"]


def test_one_list_of_languages_and_accents() -> None:
    """Validation, the front end and the CLI use the same objects as constants.py."""
    from vallexctl.commands import speak
    from vallexd import constants, text
    from vallexd.service import requests
    from vallexd.text import frontend, segments

    assert requests.REQUEST_LANGUAGES is constants.REQUEST_LANGUAGES is text.REQUEST_LANGUAGES
    assert frontend.REQUEST_LANGUAGES is constants.REQUEST_LANGUAGES
    assert requests.ACCENTS is frontend.ACCENTS is constants.ACCENTS
    assert segments.LANGUAGES is constants.LANGUAGES
    choices = {p.name: p.type for p in speak.speak.params}
    assert tuple(choices["language"].choices) == constants.REQUEST_LANGUAGES
    assert tuple(choices["accent"].choices) == constants.ACCENTS


@pytest.mark.slow
def test_vallexctl_help_imports_no_torch() -> None:
    code = ("import sys, vallexctl.cli; "
            "print(sorted(m for m in ('torch', 'numpy', 'aiohttp', 'vocos') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
