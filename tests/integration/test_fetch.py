"""Downloads over real loopback HTTP: resume with Range, restart when Range is ignored, digest
checks that leave nothing behind, preset install by catalogue name, `models fetch|verify`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from daemon_harness import DaemonProcess
from loopback_http import FileServer, serving

from vallexctl import catalogue
from vallexctl.cli import cli
from vallexctl.download import DigestMismatch, DownloadFailed, download, part_path
from vallexctl.model_files import MANIFEST, MODEL_FILES
from vallexd.errors import NotFound
from vallexd.storage.prompts import load_prompt, prompt_digest

VALLEXCTL = Path(sys.executable).with_name("vallexctl")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[FileServer, bytes]]:
    """A server with one 300 KB file at /blob.bin."""
    root = tmp_path / "www"
    root.mkdir()
    blob = os.urandom(300_000)
    (root / "blob.bin").write_bytes(blob)
    with serving(root) as server:
        yield server, blob


# --------------------------------------------------------------------------- fetch.download


def test_download_verifies_and_renames_atomically(files: tuple[FileServer, bytes], tmp_path: Path) -> None:
    server, blob = files
    seen: list[tuple[int, int | None]] = []
    dest = tmp_path / "out" / "blob.bin"
    result = download(f"{server.url}/blob.bin", dest, sha256=sha(blob),
                      progress=lambda d, t: seen.append((d, t)))
    assert dest.read_bytes() == blob
    assert result.sha256 == sha(blob) and result.size == len(blob) and not result.resumed
    assert not part_path(dest).exists()
    assert seen[-1] == (len(blob), len(blob))


def test_digest_mismatch_leaves_nothing(files: tuple[FileServer, bytes], tmp_path: Path) -> None:
    server, _ = files
    out = tmp_path / "out"
    with pytest.raises(DigestMismatch) as info:
        download(f"{server.url}/blob.bin", out / "blob.bin", sha256="0" * 64)
    assert info.value.reason == "DIGEST_MISMATCH"
    assert list(out.iterdir()) == []


def test_interrupted_download_resumes_with_range(files: tuple[FileServer, bytes], tmp_path: Path) -> None:
    server, blob = files
    dest = tmp_path / "blob.bin"
    server.drop["/blob.bin"] = (100_000, 1)
    with pytest.raises(DownloadFailed) as info:
        download(f"{server.url}/blob.bin", dest, sha256=sha(blob), retries=0)
    assert "resume" in info.value.message
    assert not dest.exists()
    assert part_path(dest).stat().st_size == 100_000  # kept for the next attempt

    result = download(f"{server.url}/blob.bin", dest, sha256=sha(blob), retries=0)
    assert result.resumed
    assert dest.read_bytes() == blob
    assert server.requests_for("/blob.bin") == [None, "bytes=100000-"]


def test_resume_never_splices_a_file_that_changed_upstream(files: tuple[FileServer, bytes],
                                                           tmp_path: Path) -> None:
    """Interrupted, then the file changes on the server: If-Range makes the server send it whole."""
    server, blob = files
    dest = tmp_path / "dl" / "blob.bin"
    server.drop["/blob.bin"] = (100_000, 1)
    with pytest.raises(DownloadFailed):
        download(f"{server.url}/blob.bin", dest, retries=0)  # no digest known: trust on first use
    assert part_path(dest).stat().st_size == 100_000
    new_blob = os.urandom(len(blob))
    (server.root / "blob.bin").write_bytes(new_blob)

    result = download(f"{server.url}/blob.bin", dest, retries=0)
    assert dest.read_bytes() == new_blob and not result.resumed
    assert result.sha256 == sha(new_blob)
    assert list(dest.parent.iterdir()) == [dest]  # no part file, no validator left behind


def test_complete_part_file_is_kept_not_downloaded_again(files: tuple[FileServer, bytes],
                                                         tmp_path: Path) -> None:
    """A run stopped between the last byte and the rename: the server answers 416 `bytes */N` with
    N == our size, so the part file is verified and renamed instead of fetched again."""
    server, blob = files
    dest = tmp_path / "blob.bin"
    part_path(dest).write_bytes(blob)
    result = download(f"{server.url}/blob.bin", dest, sha256=sha(blob), retries=0)
    assert dest.read_bytes() == blob and result.resumed
    assert server.requests_for("/blob.bin") == [f"bytes={len(blob)}-"]


def test_dropped_connection_retried_within_one_call(files: tuple[FileServer, bytes], tmp_path: Path) -> None:
    server, blob = files
    server.drop["/blob.bin"] = (50_000, 2)  # two drops, then the rest
    result = download(f"{server.url}/blob.bin", tmp_path / "b", sha256=sha(blob), retries=2,
                      backoff=0.01)
    assert result.resumed and (tmp_path / "b").read_bytes() == blob
    assert server.requests_for("/blob.bin") == [None, "bytes=50000-", "bytes=100000-"]


def test_server_without_range_support_restarts_cleanly(files: tuple[FileServer, bytes],
                                                       tmp_path: Path) -> None:
    server, blob = files
    server.ranges = False
    dest = tmp_path / "blob.bin"
    stale = b"stale bytes from another attempt"
    part_path(dest).write_bytes(stale)
    result = download(f"{server.url}/blob.bin", dest, sha256=sha(blob))
    assert dest.read_bytes() == blob  # the stale prefix was not spliced in
    assert not result.resumed
    assert server.requests_for("/blob.bin") == [f"bytes={len(stale)}-"]


def test_missing_url_is_not_found(files: tuple[FileServer, bytes], tmp_path: Path) -> None:
    server, _ = files
    with pytest.raises(NotFound):
        download(f"{server.url}/nope.bin", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not part_path(tmp_path / "x").exists()


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadFailed) as info:
        download("http://127.0.0.1:9/x.bin", tmp_path / "x", retries=0, timeout=2)
    assert "cannot reach" in info.value.message


# --------------------------------------------------------------------------- presets from the catalogue


def test_shipped_catalogue_lists_all_53_presets(shared_presets_dir: Path) -> None:
    entries = catalogue.load_catalogue(catalogue.find_catalogue({}))
    assert len(entries) == 53
    assert sum(e.group == "finetuned" for e in entries) == 12
    sums = dict(line.split()[::-1] for line in (shared_presets_dir / "SHA256SUMS").read_text().splitlines())
    for e in entries:
        path = f"{e.group}/{e.name}.npz"
        assert sums[path] == e.sha256, e.name
        assert e.url.startswith("https://raw.githubusercontent.com/")
    yshtola = catalogue.lookup("y'shtola-finetuned", entries)
    assert yshtola is not None and yshtola.language == "ja"
    assert yshtola.url.endswith("Y%27shtola-Finetuned.npz")
    assert catalogue.lookup("paimon", entries).language == "zh"  # type: ignore[union-attr]
    assert catalogue.lookup("vctk_1", entries).language == "en"  # type: ignore[union-attr]


def write_test_catalogue(path: Path, base_url: str, *, corrupt: str | None = None) -> Path:
    """The shipped catalogue with every URL moved to `base_url` (a loopback mirror of shared/presets)."""
    text = catalogue.find_catalogue({}).read_text()
    text = text.replace("https://raw.githubusercontent.com/ElinLiu0/VALLEX-Inference-Http/master/"
                        "Finetuned-VALL-E_Prompt/", f"{base_url}/finetuned/")
    text = text.replace("https://raw.githubusercontent.com/Plachtaa/VALL-E-X/master/presets/",
                        f"{base_url}/upstream/")
    if corrupt:
        entry = catalogue.lookup(corrupt, catalogue.load_catalogue(catalogue.find_catalogue({})))
        assert entry is not None
        text = text.replace(entry.sha256, "f" * 64)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    return daemon_factory("fetchd")


def test_preset_install_by_catalogue_name(daemon: DaemonProcess, shared_presets_dir: Path,
                                          tmp_path: Path) -> None:
    with serving(shared_presets_dir) as server:
        cat = write_test_catalogue(tmp_path / "cat.toml", server.url)
        result = CliRunner().invoke(cli, ["--socket", str(daemon.socket_path), "--json", "preset", "install",
                                          "Y'shtola-Finetuned", "--catalogue", str(cat)])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert out["name"] == "Y'shtola-Finetuned" and out["language"] == "ja"
        assert server.requests_for("/finetuned/Y'shtola-Finetuned.npz") == [None]
    # The daemon stores a normalised copy: compare the prompt content, not the zip bytes.
    installed = load_prompt(daemon.presets_dir / "Y'shtola-Finetuned.npz")
    original = load_prompt(shared_presets_dir / "finetuned" / "Y'shtola-Finetuned.npz")
    assert prompt_digest(installed) == prompt_digest(original)
    names = [p["name"] for p in daemon.call("presets.list")["presets"]]
    assert "Y'shtola-Finetuned" in names


def test_preset_digest_mismatch_refuses_and_leaves_nothing(daemon: DaemonProcess, shared_presets_dir: Path,
                                                           tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    before = sorted(p.name for p in daemon.presets_dir.iterdir())
    with serving(shared_presets_dir) as server:
        cat = write_test_catalogue(tmp_path / "cat.toml", server.url, corrupt="paimon")
        # A real process, so TMPDIR really decides where the download goes.
        done = subprocess.run(
            [str(VALLEXCTL), "--socket", str(daemon.socket_path), "preset", "install", "paimon",
             "--catalogue", str(cat)],
            capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(scratch)},
        )
        assert server.requests_for("/upstream/paimon.npz") == [None]
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "sha256" in done.stderr, done.stderr
    assert list(scratch.iterdir()) == []  # no temp file, no .part
    assert sorted(p.name for p in daemon.presets_dir.iterdir()) == before


def test_preset_install_from_a_url(daemon: DaemonProcess, shared_presets_dir: Path) -> None:
    expected = sha((shared_presets_dir / "upstream" / "vctk_2.npz").read_bytes())
    with serving(shared_presets_dir) as server:
        url = f"{server.url}/upstream/vctk_2.npz"
        wrong = CliRunner().invoke(cli, ["--socket", str(daemon.socket_path), "preset", "install", url,
                                         "--sha256", "0" * 64])
        assert wrong.exit_code == 1 and "sha256" in wrong.stderr
        right = CliRunner().invoke(cli, ["--socket", str(daemon.socket_path), "--json", "preset", "install",
                                         url, "--sha256", expected, "--progress"])
    assert right.exit_code == 0, right.output
    assert json.loads(right.stdout)["name"] == "vctk_2"  # named after the URL's file
    assert "vctk_2.npz  100%" in right.stderr


def test_preset_install_unknown_name_is_not_found(daemon: DaemonProcess, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--socket", str(daemon.socket_path), "preset", "install",
                                      "no-such-voice"])
    assert result.exit_code == 4
    assert "presets list --available" in result.stderr


# --------------------------------------------------------------------------- models fetch / verify


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[FileServer, Path]]:
    """Fake model files laid out like the models folder (contents are random, not models)."""
    root = tmp_path / "mirror"
    for mf in MODEL_FILES:
        path = root / mf.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(200_000 if mf.key == "checkpoint" else 5_000))
    with serving(root) as server:
        yield server, root


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def test_models_fetch_resumes_records_and_verifies(mirror: tuple[FileServer, Path], tmp_path: Path) -> None:
    server, root = mirror
    models = tmp_path / "models"
    ckpt = "/vallex-checkpoint.pt"
    server.drop[ckpt] = (30_000, 3)  # more drops than the automatic retries: the first run fails
    first = invoke("models", "fetch", "--dir", str(models), "--base-url", server.url, "--no-encodec")
    assert first.exit_code == 1, first.output
    assert "resume" in first.stderr
    assert server.requests_for(ckpt) == [None, "bytes=30000-", "bytes=60000-"]
    assert (models / "vallex-checkpoint.pt.part").stat().st_size == 90_000

    second = invoke("--json", "models", "fetch", "--dir", str(models), "--base-url", server.url,
                    "--no-encodec")
    assert second.exit_code == 0, second.output
    report = {f["file"]: f for f in json.loads(second.stdout)["files"]}
    assert report["vallex-checkpoint.pt"]["resumed"] is True
    assert server.requests_for(ckpt)[-1] == "bytes=90000-"
    for rel in ("vallex-checkpoint.pt", "vocos-encodec-24khz/config.yaml",
                "vocos-encodec-24khz/pytorch_model.bin"):
        assert (models / rel).read_bytes() == (root / rel).read_bytes()
    manifest = json.loads((models / MANIFEST).read_text())["files"]
    assert manifest["vallex-checkpoint.pt"]["sha256"] == sha((root / "vallex-checkpoint.pt").read_bytes())

    verify = invoke("--json", "models", "verify", "--dir", str(models))
    assert verify.exit_code == 0, verify.output
    assert json.loads(verify.stdout)["ok"] is True

    # The recorded digest is checked on a later fetch: upstream "changes" the file.
    (models / "vallex-checkpoint.pt").unlink()
    (root / "vallex-checkpoint.pt").write_bytes(os.urandom(200_000))
    third = invoke("models", "fetch", "--dir", str(models), "--base-url", server.url, "--no-encodec")
    assert third.exit_code == 1
    assert "recorded" in third.stderr and third.stderr.count("\n") == 1
    assert not (models / "vallex-checkpoint.pt").exists()
    assert not (models / "vallex-checkpoint.pt.part").exists()


def test_models_verify_reports_a_damaged_file(mirror: tuple[FileServer, Path], tmp_path: Path) -> None:
    server, _ = mirror
    models = tmp_path / "models"
    done = subprocess.run([str(VALLEXCTL), "models", "fetch", "--dir", str(models), "--no-encodec"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "VALLEXCTL_MODELS_BASE_URL": server.url})
    assert done.returncode == 0, done.stderr
    with (models / "vocos-encodec-24khz" / "config.yaml").open("ab") as fh:
        fh.write(b"# tampered\n")
    verify = invoke("models", "verify", "--dir", str(models))
    assert verify.exit_code == 1
    assert "mismatch  vocos-encodec-24khz/config.yaml" in verify.stdout
    as_json = invoke("--json", "models", "verify", "--dir", str(models))
    assert as_json.exit_code == 1
    doc = json.loads(as_json.stdout)  # exactly one JSON document, the error carrying the report
    assert doc["ok"] is False and doc["error"]["reason"] == "DIGEST_MISMATCH"
    assert any(f["status"] == "mismatch" for f in doc["error"]["details"]["files"])
    # A second fetch checks what is there against the record too, and refuses.
    again = invoke("models", "fetch", "--dir", str(models), "--base-url", server.url, "--no-encodec")
    assert again.exit_code == 1 and "delete it" in again.stderr


def test_encodec_name_prefix_is_checked(mirror: tuple[FileServer, Path], tmp_path: Path) -> None:
    """The EnCodec file name carries the first 8 hex digits of its sha256; random bytes fail it."""
    server, _ = mirror
    models = tmp_path / "models"
    result = invoke("models", "fetch", "--dir", str(models), "--base-url", server.url)
    assert result.exit_code == 1
    assert "d7cc33bc" in result.stderr
    assert not (models / "encodec_24khz-d7cc33bc.th").exists()
    assert not (models / "encodec_24khz-d7cc33bc.th.part").exists()
