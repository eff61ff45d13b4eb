"""The model reproduces the reference vectors in ../shared/reference/model-tiny exactly (CPU, float32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE, ROOT, require_shared

from vallexd.inference.checkpoint import load_model
from vallexd.inference.model import VallEX, language_ids, prefill_mask
from vallexd.tools.conformance import compare_case, read_cases

TINY = REFERENCE / "model-tiny"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_reference() -> tuple[VallEX, list[dict]]:
    require_shared(TINY / "checkpoint.pt")
    model = load_model(TINY / "checkpoint.pt", torch.device("cpu"), torch.float32)
    cases = [case for _, case in read_cases(TINY / "cases.jsonl")]
    return model, cases


def test_four_cases_match_exactly(tiny_reference: tuple[VallEX, list[dict]]) -> None:
    model, cases = tiny_reference
    assert len(cases) == 4
    for case in cases:
        result = compare_case(model, case)
        assert result.match, result.line()
    # The no-prompt case and the per-token-language case are both among them.
    assert any(not c["prompt_codes"] for c in cases)
    assert any(isinstance(c["text_language"], list) for c in cases)


def test_kv_cache_equals_full_recomputation(tiny_reference: tuple[VallEX, list[dict]]) -> None:
    """The cached AR step gives the logits a full masked pass over the whole sequence gives."""
    model, cases = tiny_reference
    case = cases[1]
    enroll, text = case["enroll_text_ids"], case["text_ids"]
    x = torch.tensor(enroll + text)
    langs = torch.tensor(language_ids(len(enroll), case["prompt_language"], case["text_language"], len(text)))
    prompt0 = torch.tensor(case["prompt_codes"])[:, 0]
    gen = model.generate_ar(x, langs, prompt0, top_k=1, temperature=1.0, generator=None)
    steps = 40
    y = torch.cat([torch.tensor([1025]), prompt0, gen[:steps]])  # BOS + prompt + 40 generated frames
    with torch.inference_mode():
        xe = model._text(
            model.ar_text_embedding, model.ar_language_embedding, model.ar_text_position, x, langs
        )
        ye = model.ar_audio_position(model.ar_audio_embedding(y).unsqueeze(0))
        mask = prefill_mask(len(x), len(y), x.device)
        h = model.ar_decoder(torch.cat([xe, ye], dim=1), mask=mask)
        full_next = model.ar_predict_layer(h[:, -1]).argmax(-1)
    assert int(full_next) == int(gen[steps])


def _run_reference_cli(cases: Path, checkpoint: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vallexd.tools.conformance", "model", str(checkpoint), str(cases)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # see conftest.one_torch_thread
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_reference_command_all_match() -> None:
    require_shared(TINY / "cases.jsonl")
    proc = _run_reference_cli(TINY / "cases.jsonl", TINY / "checkpoint.pt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "4/4 cases match"
    assert sum(line.endswith("frames)") and ": match" in line for line in lines) == 4


def test_reference_command_reports_tampered_case(tmp_path: Path) -> None:
    require_shared(TINY / "cases.jsonl")
    cases = [case for _, case in read_cases(TINY / "cases.jsonl")]
    small = min(cases, key=lambda c: len(c["expected_codes"]))
    tampered = json.loads(json.dumps(small))
    frame = 7
    tampered["expected_codes"][frame][3] = (tampered["expected_codes"][frame][3] + 1) % 1024
    path = tmp_path / "tampered.jsonl"
    path.write_text(json.dumps(tampered) + "\n")
    proc = _run_reference_cli(path, TINY / "checkpoint.pt")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "0/1 cases match"
    assert "MISMATCH" in lines[0] and f"first differing frame {frame}" in lines[0]
    expected_row = small["expected_codes"][frame]
    assert f"got {expected_row}" in lines[0]  # the model's output is the untampered row


def test_reference_command_bad_checkpoint_exits_2(tmp_path: Path) -> None:
    require_shared(TINY / "cases.jsonl")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint" * 10)
    proc = _run_reference_cli(TINY / "cases.jsonl", junk)
    assert proc.returncode == 2
    assert "junk.pt" in proc.stderr


def test_reference_g2p_subcommand_is_wired(tmp_path: Path) -> None:
    """`python -m vallexd.tools.conformance g2p` hands over to the text front end's checker."""
    g2p = require_shared(REFERENCE / "g2p.jsonl")
    lines = g2p.read_text(encoding="utf-8").splitlines()
    subset = tmp_path / "g2p-subset.jsonl"
    subset.write_text("\n".join(lines[:5]) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "vallexd.tools.conformance", "g2p", str(subset)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5/5" in proc.stdout
