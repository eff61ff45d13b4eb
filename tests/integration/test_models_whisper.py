"""`vallexctl models fetch --encodec / --whisper` over real loopback HTTP: only the chosen files,
Whisper's published sha256 checked from the first byte on, resume, manifest and verify."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from loopback_http import FileServer, serving

from vallexctl import model_files as mdl
from vallexctl.cli import cli


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[FileServer, Path]]:
    root = tmp_path / "mirror"
    (root / "whisper").mkdir(parents=True)
    for size in ("tiny", "medium"):
        (root / "whisper" / f"{size}.pt").write_bytes(os.urandom(150_000))
    (root / mdl.ENCODEC.relpath).write_bytes(os.urandom(5_000))
    with serving(root) as server:
        yield server, root


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def test_whisper_url_and_digest_are_openai_whispers() -> None:
    mf = mdl.whisper_file()
    assert mf.relpath == "whisper/medium.pt" and mf.sha256 == mdl.WHISPER_SHA256["medium"]
    assert mf.url.endswith(f"/{mf.sha256}/medium.pt")
    with pytest.raises(Exception, match="unknown Whisper size"):
        mdl.whisper_file("medium.en")


def test_a_file_that_is_not_the_published_whisper_is_refused(mirror: tuple[FileServer, Path],
                                                             tmp_path: Path) -> None:
    server, _ = mirror
    models = tmp_path / "models"
    result = invoke("models", "fetch", "--dir", str(models), "--base-url", server.url, "--whisper")
    assert result.exit_code == 1
    assert "publisher" in result.stderr and mdl.WHISPER_SHA256["medium"] in result.stderr
    assert list((models / "whisper").iterdir()) == []  # no part file kept of known-bad bytes
    assert server.requests_for("/vallex-checkpoint.pt") == []  # --whisper fetches Whisper only


def test_fetch_whisper_resumes_records_and_verifies(mirror: tuple[FileServer, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    server, root = mirror
    data = (root / "whisper" / "tiny.pt").read_bytes()
    monkeypatch.setitem(mdl.WHISPER_SHA256, "tiny", hashlib.sha256(data).hexdigest())  # "published"
    models = tmp_path / "models"
    server.drop["/whisper/tiny.pt"] = (30_000, 3)  # more drops than the automatic retries
    args = ("models", "fetch", "--dir", str(models), "--base-url", server.url, "--whisper",
            "--whisper-size", "tiny")
    first = invoke(*args)
    assert first.exit_code == 1 and "resume" in first.stderr
    assert (models / "whisper" / "tiny.pt.part").stat().st_size == 90_000
    second = invoke("--json", *args)
    assert second.exit_code == 0, second.output
    [row] = json.loads(second.stdout)["files"]
    assert (row["file"], row["status"], row["resumed"]) == ("whisper/tiny.pt", "downloaded", True)
    assert server.requests_for("/whisper/tiny.pt")[-1] == "bytes=90000-"
    assert (models / "whisper" / "tiny.pt").read_bytes() == data
    manifest = json.loads((models / mdl.MANIFEST).read_text())["files"]
    assert manifest["whisper/tiny.pt"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert invoke(*args).exit_code == 0  # present and matching: nothing fetched again
    verify = invoke("--json", "models", "verify", "--dir", str(models))
    doc = json.loads(verify.stdout)  # the checkpoint etc. are missing: an error carrying the report
    files = doc["files"] if verify.exit_code == 0 else doc["error"]["details"]["files"]
    assert {f["file"]: f["status"] for f in files}["whisper/tiny.pt"] == "ok"


def test_encodec_alone(mirror: tuple[FileServer, Path], tmp_path: Path) -> None:
    server, _ = mirror
    result = invoke("models", "fetch", "--dir", str(tmp_path / "m"), "--base-url", server.url, "--encodec")
    assert result.exit_code == 1 and "d7cc33bc" in result.stderr  # random bytes fail the name's prefix
    assert server.requests_for("/vallex-checkpoint.pt") == []
    both = invoke("models", "fetch", "--encodec", "--no-encodec")
    assert both.exit_code == 2
