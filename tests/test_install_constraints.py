"""The CPU-only install path (README "GPUs and torch builds") stays installable: pip parses
constraints/torch-cpu.txt, it points at PyTorch's CPU index, and its pins are pyproject's own
torch/torchaudio versions (a "+cpu" local version satisfies pyproject's "==X.Y.Z").

Nothing is downloaded: the file goes through pip's own requirements parser, offline.
"""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pip's own pkg_resources use
CONSTRAINTS = ROOT / "constraints" / "torch-cpu.txt"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        name, sep, version = dep.partition("==")
        if sep and name.strip() in ("torch", "torchaudio"):
            pins[name.strip()] = version.strip()
    return pins


def test_cpu_constraints_parse_and_match_the_pins() -> None:
    pytest.importorskip("pip")
    from pip._internal.network.session import PipSession
    from pip._internal.req.req_file import RequirementsFileParser, get_line_parser, parse_requirements
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import Version

    session = PipSession()
    lines = list(RequirementsFileParser(session, get_line_parser(None)).parse(str(CONSTRAINTS), True))
    indexes = [url for line in lines if not line.is_requirement for url in line.opts.extra_index_urls or []]
    assert indexes == [CPU_INDEX]

    constraints = {}
    for parsed in parse_requirements(str(CONSTRAINTS), session=session, constraint=True):
        assert parsed.constraint
        req = Requirement(parsed.requirement)
        (spec,) = req.specifier
        constraints[req.name] = Version(spec.version)
    pins = pyproject_pins()
    assert set(constraints) == set(pins) == {"torch", "torchaudio"}
    for name, version in constraints.items():
        assert version.local == "cpu", name
        assert version.public == pins[name], f"{name}: constraints {version}, pyproject {pins[name]}"
        assert SpecifierSet(f"=={pins[name]}").contains(version), name  # pip can satisfy both at once
