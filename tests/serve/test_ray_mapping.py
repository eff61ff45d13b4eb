"""vallexd-ray's mapping of the configuration onto Ray Serve's options, of Ray's failures onto wire
errors, and its refusals of a bad configuration before Ray starts (a real `vallexd-ray` process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vallexd.config import load_config
from vallexd.config.settings import ConfigError
from vallexd.errors import Busy, ErrorCode, InvalidArgument, Timeout
from vallexd.serve.ray import replica_options


def config(tmp_path: Path, *args: str):
    return load_config(["--cache-dir", str(tmp_path / "cache"), "--presets-dir", str(tmp_path / "p"),
                        *args], environ={}, prog="vallexd-ray")


def test_queue_and_batch_map_onto_rays_limits(tmp_path: Path) -> None:
    args = ("--max-batch", "6", "--queue-limit", "10", "--ray-replicas", "3", "--ray-replica-cpus", "4",
            "--ray-replica-gpus", "1")
    options = replica_options(config(tmp_path, *args))
    assert options == {"ray_actor_options": {"num_cpus": 4.0, "num_gpus": 1.0}, "max_ongoing_requests": 6,
                       "max_queued_requests": 10, "num_replicas": 3}
    # vallexd's queue_limit 0 ("nothing waits beyond the batch") is Ray's smallest queue, 1.
    assert replica_options(config(tmp_path, "--queue-limit", "0"))["max_queued_requests"] == 1


def test_autoscaling_needs_both_bounds_in_order(tmp_path: Path) -> None:
    options = replica_options(config(tmp_path, "--ray-min-replicas", "0", "--ray-max-replicas", "4",
                                     "--ray-target-ongoing", "3"))
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                             "target_ongoing_requests": 3.0}
    with pytest.raises(ConfigError, match="both"):
        replica_options(config(tmp_path, "--ray-max-replicas", "4"))
    with pytest.raises(ConfigError, match="more than"):
        replica_options(config(tmp_path, "--ray-min-replicas", "5", "--ray-max-replicas", "4"))


def test_rays_failures_become_wire_errors() -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    from vallexd.serve.ingress import from_ray

    busy = from_ray(serve_errors.BackPressureError(num_queued_requests=3, max_queued_requests=3), "t")
    assert isinstance(busy, Busy) and busy.reason == "QUEUE_FULL"
    for lost in (ray_errors.ActorDiedError(), serve_errors.ReplicaUnavailableError("r1"),
                 ray_errors.ActorUnavailableError("gone", None)):
        err = from_ray(lost, "t")
        assert err.code is ErrorCode.UNAVAILABLE and err.reason == "REPLICA_LOST"
    assert isinstance(from_ray(serve_errors.RequestCancelledError("x"), "t"), Timeout)
    same = InvalidArgument("bad", reason="EMPTY_TEXT")
    assert from_ray(same, "t") is same
    assert from_ray(RuntimeError("bug"), "t").code is ErrorCode.INTERNAL


@pytest.mark.parametrize(("args", "message"), [
    ((), "set http_port"),
    (("--http-port", "0", "--http-host", "0.0.0.0"), "needs a bearer token"),
    (("--http-port", "0", "--ray-min-replicas", "1"), "autoscaling needs both"),
    (("--http-port", "0", "--ray-replicas", "0"), "ray_replicas"),
])
def test_vallexd_ray_refuses_a_bad_configuration_before_starting_ray(tmp_path: Path, args: tuple[str, ...],
                                                                     message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "vallexd.serve.ray", "--cache-dir", str(tmp_path / "c"),
                           "--presets-dir", str(tmp_path / "p"), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_vallexd_ray_refuses_a_cluster_address_where_nothing_listens(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vallexd.serve.ray", "--cache-dir", str(tmp_path / "c"),
                           "--presets-dir", str(tmp_path / "p"), "--http-port", "0",
                           "--ray-address", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no Ray cluster answers at 127.0.0.1:1" in proc.stderr, proc.stderr


def test_vallexd_ray_refuses_replicas_the_local_instance_cannot_place(tmp_path: Path) -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    proc = subprocess.run([sys.executable, "-m", "vallexd.serve.ray", "--cache-dir", str(tmp_path / "c"),
                           "--presets-dir", str(tmp_path / "p"), "--http-port", "0",
                           "--ray-replica-gpus", "1000"], capture_output=True, text=True, timeout=120)
    if "Ray did not start" in proc.stderr:
        pytest.skip(f"Ray cannot start here: {proc.stderr[-500:]}")
    assert proc.returncode == 2, proc.stderr
    assert "1000 GPUs" in proc.stderr and "ray_replica_gpus" in proc.stderr, proc.stderr
