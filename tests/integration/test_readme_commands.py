"""Issue 14 item 2: the README's commands work as written.

- Every code block preceded by `<!-- readme-test -->` runs, in README order, as a new user in a
  scratch HOME: shell blocks with `bash -e`, Python blocks with the venv's python. The one thing
  done for the user is the README's step 1 (`vallexctl models fetch`): tiny weights are put where
  it would put the real ones. Preset downloads come from a loopback mirror (VALLEXCTL_CATALOGUE),
  `--play` from a player on PATH that checks it got a WAV, and the daemon gets the test's
  `VALLEXD_*` settings (free static port, one thread). Opt-in per block, so a new README section
  never breaks this test until its author marks it.
- Every `vallexctl ...` command anywhere in the README (code blocks and inline code) is valid
  shell: `shlex.split` accepts it (an unquoted `Y'shtola` would not).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_harness import ScratchUser, preset_file, write_catalogue
from loopback_http import serving

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- readme-test -->"

PLAYER = """#!/bin/sh
# A stand-in for paplay: succeeds only when given a RIFF/WAVE file.
head -c 4 "$1" | grep -q RIFF
"""


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str  # "sh" or "python"
    code: str


def marked_blocks(text: str) -> list[Block]:
    """The fenced blocks right after a marker (blank lines between are allowed), dedented."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        fence = lines[j].strip() if j < len(lines) else ""
        assert fence.startswith("```"), f"README line {i + 1}: {MARKER} must be followed by a fenced block"
        language = fence[3:].strip() or "sh"
        assert language in ("sh", "bash", "python"), f"README line {j + 1}: cannot run {language!r} blocks"
        end = j + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        code = textwrap.dedent("\n".join(lines[j + 1:end]))
        blocks.append(Block(j + 1, "python" if language == "python" else "sh", code))
    return blocks


def readme_commands(text: str) -> list[str]:
    """`vallexctl ...` commands in inline code and in code blocks (markdown's `\\|` unescaped)."""
    commands = [m.replace("\\|", "|") for m in re.findall(r"`(vallexctl [^`]+)`", text)]
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("vallexctl ", "sudo vallexctl ")) or " && vallexctl " in stripped:
            commands.append(stripped)
    return commands


def test_every_readme_command_is_valid_shell() -> None:
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) > 20
    with pytest.raises(ValueError):  # what this test exists for: the old README's command
        shlex.split("vallexctl preset install Y'shtola-Finetuned")
    for command in commands:
        try:
            shlex.split(command, comments=True)
        except ValueError as exc:
            pytest.fail(f"README command is not valid shell ({exc}): {command}")


def test_the_marker_finds_blocks() -> None:
    blocks = marked_blocks(README.read_text(encoding="utf-8"))
    assert [b.language for b in blocks].count("python") >= 1 and len(blocks) >= 4
    assert not marked_blocks("text\n\n```sh\nfalse\n```\n")  # unmarked blocks are never run


def test_marked_readme_blocks_run(tiny_models: object, tmp_path: Path) -> None:
    user = ScratchUser(tmp_path, VALLEXD_STATIC_PORT="0", VALLEXD_THREADS="1", VALLEXD_DEVICE="cpu")
    user.install_models(tiny_models)  # what step 1, `vallexctl models fetch`, leaves
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "paplay").write_text(PLAYER)
    (bin_dir / "paplay").chmod(0o755)
    served = tmp_path / "mirror"
    served.mkdir()
    presets = [("paimon", preset_file(served / "paimon.npz", 1)),
               ("Y'shtola-Finetuned", preset_file(served / "Y'shtola-Finetuned.npz", 2))]
    blocks = marked_blocks(README.read_text(encoding="utf-8"))
    env = {"PATH": f"{bin_dir}:{user.env['PATH']}"}
    try:
        with serving(served) as mirror:
            catalogue = write_catalogue(tmp_path / "catalogue.toml", mirror.url, presets)
            env["VALLEXCTL_CATALOGUE"] = str(catalogue)
            for block in blocks:
                args = ["bash", "-e", "-o", "pipefail", "-c", block.code] if block.language == "sh" \
                    else [sys.executable, "-c", block.code]
                done = subprocess.run(args, cwd=tmp_path, env={**user.env, **env}, capture_output=True,
                                      text=True, timeout=300)
                assert done.returncode == 0, (
                    f"README block at line {block.line} failed ({done.returncode}):\n{block.code}\n"
                    f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    finally:
        subprocess.run(["vallexctl", "daemon", "stop"], env={**user.env, **env}, capture_output=True,
                       timeout=60)
    for wav in ("hello.wav", "nihao.wav", "yshtola.wav"):
        assert (tmp_path / wav).read_bytes()[:4] == b"RIFF", wav
