"""A fatal accelerator error makes the daemon answer the request, stop, and exit 1 (for a restart).

The daemon runs in this process (real Unix socket, real client in a thread) so that the failure can
be raised inside its real model: `torch.AcceleratorError` from the AR decoding step, as CUDA raises
it after a device-side assert.  An out-of-memory error in the same place is answered and served past.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from daemon_harness import RpcClient
from service.test_service import make_config

from vallexd.server.daemon import Daemon

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def raise_in_ar_step(daemon: Daemon, monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    decoder = daemon.service.worker.engine.model.ar_decoder
    real = decoder.step
    left = [1]

    def step(*args: Any) -> Any:
        if left[0]:
            left[0] -= 1
            raise exc
        return real(*args)

    monkeypatch.setattr(decoder, "step", step)


async def wait_started(daemon: Daemon, task: asyncio.Task[int]) -> None:
    for _ in range(600):
        if daemon.rpc is not None and daemon.service is not None and daemon.service.worker.model_loaded:
            return
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    raise AssertionError("daemon did not start")


def call(socket_path: Path, params: dict[str, Any]) -> dict[str, Any]:
    with RpcClient(socket_path) as client:
        return client.request("synthesize", params)[1]


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_fatal_accelerator_error_exits_1_oom_does_not(
    tmp_path: Path, tiny_models: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path, tiny_models, static_enabled=False, grace_s=2.0, http_port=0)
    daemon = Daemon(config)
    task = asyncio.create_task(daemon.run())
    await wait_started(daemon, task)
    sock = config.socket_path

    raise_in_ar_step(daemon, monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    reply = await asyncio.to_thread(call, sock, {"text": "Hi.", "language": "en", "seed": 2})
    assert reply["error"]["code"] == "RESOURCE_EXHAUSTED" and reply["error"]["reason"] == "OUT_OF_MEMORY"
    reply = await asyncio.to_thread(call, sock, {"text": "Hi.", "language": "en", "seed": 2})
    assert "result" in reply and not task.done()
    # Over HTTP the same failure is a 503 with the typed error.
    assert daemon.http is not None
    raise_in_ar_step(daemon, monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    status, body = await asyncio.to_thread(post, daemon.http.url + "/v1/synthesize",
                                           {"text": "Hey.", "language": "en", "seed": 2})
    assert status == 503 and body["error"]["code"] == "RESOURCE_EXHAUSTED", (status, body)

    raise_in_ar_step(daemon, monkeypatch, torch.AcceleratorError("CUDA error: device-side assert triggered"))
    reply = await asyncio.to_thread(call, sock, {"text": "Bye.", "language": "en", "seed": 2})
    assert reply["error"]["code"] == "UNAVAILABLE" and reply["error"]["reason"] == "ACCELERATOR_FAILED"
    assert await asyncio.wait_for(task, timeout=30) == 1
    assert not sock.exists()  # a normal shutdown otherwise: the socket is removed


@pytest.mark.parametrize(("reason", "option", "safe"), [("BAD_DTYPE", "--dtype", "auto"),
                                                        ("BAD_QUANTIZE", "--quantize", "none")])
def test_a_refused_option_at_load_names_it_and_exits_2(reason: str, option: str, safe: str) -> None:
    from vallexd.errors import InvalidArgument, Unavailable
    from vallexd.server.daemon import load_failure

    err = Unavailable("cannot load the model: refused", reason="MODEL_LOAD_FAILED")
    err.__cause__ = InvalidArgument("this CPU cannot", reason=reason)
    message, code = load_failure(err)
    assert code == 2 and f"change {option}" in message and f"e.g. {option} {safe}" in message
