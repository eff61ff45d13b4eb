"""Run the real `vallexctl` as a new user would: a scratch HOME, its own runtime folder, subprocesses.

    user = ScratchUser(tmp_path)                 # HOME, XDG_RUNTIME_DIR inside tmp_path
    done = user.ctl("status")                    # CompletedProcess[str]
    line = error_line(done)                      # the ONE stderr line (asserts there is one)

Also: a real preset file, and a catalogue whose entries point at a loopback mirror.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from daemon_harness import daemon_env

from vallexd.storage.prompts import Prompt, save_prompt

VALLEXCTL = str(Path(sys.executable).with_name("vallexctl"))
BIN_DIR = str(Path(sys.executable).parent)


class ScratchUser:
    """A fresh user: HOME and XDG_RUNTIME_DIR in `root`, nothing of the real user's, the venv on PATH."""

    def __init__(self, root: Path, **extra: str) -> None:
        self.root = root
        self.home = root / "home"
        self.run = root / "run"
        self.home.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(mode=0o700, exist_ok=True)
        env = daemon_env({"HOME": str(self.home), "XDG_RUNTIME_DIR": str(self.run)})
        for key in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME",
                    "VALLEXCTL_MODELS_BASE_URL", "VALLEXCTL_CATALOGUE"):
            env.pop(key, None)
        env["PATH"] = BIN_DIR + os.pathsep + env.get("PATH", "")
        env.update(extra)
        self.env = env

    @property
    def models_dir(self) -> Path:
        return self.home / ".local" / "share" / "vallexd" / "models"

    @property
    def demo_dir(self) -> Path:
        return self.home / ".local" / "share" / "vallexd" / "tiny-demo"

    @property
    def socket_path(self) -> Path:
        return self.run / "vallexd" / "vallexd.sock"

    @property
    def log_file(self) -> Path:
        return self.home / ".local" / "state" / "vallexd" / "vallexd.log"

    def ctl(self, *args: str, timeout: float = 180, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([VALLEXCTL, *args], capture_output=True, text=True, timeout=timeout,
                              cwd=self.root, env={**self.env, **(env or {})}, input=input)

    def install_models(self, tiny_models: object) -> Path:
        """What `vallexctl models fetch` would leave (tiny weights, as the README's step 1)."""
        shutil.copytree(tiny_models.root, self.models_dir, dirs_exist_ok=True)  # type: ignore[attr-defined]
        return self.models_dir


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a failed command (asserts it is one line, prefixed).

    Progress notes ("... loading its model ...", "fetching ... ...") end in "..." and are not
    counted: they come before the error, each on its own line.
    """
    lines = [ln for ln in done.stderr.strip().splitlines() if not ln.rstrip().endswith("...")]
    assert len(lines) == 1, f"expected one stderr line, got:\n{done.stderr}"
    assert lines[0].startswith("vallexctl"), lines[0]
    return lines[0]


def preset_file(path: Path, seed: int = 0) -> Path:
    """A real, very short prompt .npz (the tiny model's work grows with the prompt length)."""
    rng = np.random.default_rng(seed)
    save_prompt(Prompt(rng.integers(0, 1024, (1, 12, 8)), np.array([[10, 20, 30]]), "en"), path)
    return path


def tone(path: Path, seconds: float, rate: int = 44100) -> Path:
    """A 220 Hz tone as a 16-bit WAV (a stand-in recording for `--from-audio`)."""
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.4 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, subtype="PCM_16")
    return path


def write_catalogue(path: Path, base_url: str, files: Iterable[tuple[str, Path]]) -> Path:
    """A catalogue of (name, served file) entries at `base_url/<file name>`, with their sha256."""
    blocks = ["version = 1"]
    for name, served in files:
        data = served.read_bytes()
        quoted = served.name.replace("'", "%27")
        blocks.append("\n".join([
            "[[preset]]",
            f'name = "{name}"',
            'language = "en"',
            'group = "test"',
            f'description = "test preset {name}"',
            f'url = "{base_url}/{quoted}"',
            f'sha256 = "{hashlib.sha256(data).hexdigest()}"',
            f"size = {len(data)}",
            "frames = 12",
        ]))
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path
