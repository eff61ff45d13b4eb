"""`vallexd-ray`: the daemon's HTTP API served by model replicas on Ray Serve.

    vallexd-ray --config vallexd.toml --ray-replicas 2            # a local Ray instance
    vallexd-ray --config vallexd.toml --ray-address auto           # the cluster of `ray start --head`

Two deployments in one application (`APP_NAME`):

    Ingress (1 replica, no CPU reserved): the daemon's aiohttp HTTP API and its static file server
        for /generate's audioURL (ingress.py)
    Replica (ray_replicas, or autoscaled): the model, each with its own continuous batching
        (replica.py), all on the same cache and presets folders

Queue and BUSY map onto Ray's own limits: a replica takes at most `max_batch` requests at once
(`max_ongoing_requests`: the rows it decodes together), and at most `queue_limit` more wait in the
ingress's router for a free replica (`max_queued_requests`, cluster-wide since the ingress is the
only caller); beyond that a request is BUSY (QUEUE_FULL), as with one daemon.

Needs the `ray` extra (`pip install 'vallexd[ray]'`); the rest of vallexd never imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from vallexd.config import Config
from vallexd.config.settings import ConfigError
from vallexd.errors import VallexError

log = logging.getLogger("vallexd.serve")

APP_NAME = "vallexd"
REPLICA_DEPLOYMENT = "Replica"
INGRESS_DEPLOYMENT = "Ingress"
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def replica_options(config: Config) -> dict[str, Any]:
    """The Replica deployment's Ray Serve options from the config (see the module docstring).

    Raises ConfigError when only one of ray_min_replicas / ray_max_replicas is set, or min > max.
    """
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.ray_replica_cpus, "num_gpus": config.ray_replica_gpus},
        "max_ongoing_requests": config.max_batch,
        # Ray wants at least 1 (or -1: unbounded); vallexd's 0 ("nothing waits") becomes 1.
        "max_queued_requests": max(config.queue_limit, 1),
    }
    low, high = config.ray_min_replicas, config.ray_max_replicas
    if (low is None) != (high is None):
        raise ConfigError("the configuration", "ray_min_replicas" if low is None else "ray_max_replicas",
                          "autoscaling needs both ray_min_replicas and ray_max_replicas")
    if low is not None and high is not None:
        if low > high:
            raise ConfigError("the configuration", "ray_min_replicas",
                              f"{low} is more than ray_max_replicas {high}")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "initial_replicas": max(low, 1),
                                         "target_ongoing_requests": config.ray_target_ongoing}
    else:
        options["num_replicas"] = config.ray_replicas
    return options


class ReplicaDeployment:
    """Ray's side of a ReplicaServer (an async constructor, which only Ray can call)."""

    async def __init__(self, config: Config) -> None:  # type: ignore[misc]
        from vallexd.serve.replica import ReplicaServer
        from vallexd.server.daemon import setup_logging

        setup_logging(config.log_level)
        self.grace_s = config.grace_s
        self.server = ReplicaServer(config)
        try:
            await self.server.start()
        except VallexError as exc:  # shown by vallexd-ray as the reason the start failed
            from vallexd.server.daemon import load_failure

            raise RuntimeError(f"{START_FAILED} replica: {load_failure(exc)[0]}") from None

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.server.call(method, params)

    async def stream(self, params: dict[str, Any]) -> AsyncIterator[tuple[str, Any]]:
        async for item in self.server.stream(params):
            yield item

    async def check_health(self) -> None:
        await self.server.check_health()

    async def __del__(self) -> None:  # Ray Serve awaits it on a graceful shutdown
        await self.server.stop(self.grace_s)


class IngressDeployment:
    """The HTTP API (and the static file server) over the replicas' handle."""

    async def __init__(self, config: Config, replicas: Any) -> None:  # type: ignore[misc]
        from vallexd.serve.ingress import RemoteService
        from vallexd.server.daemon import setup_logging
        from vallexd.server.http_api import HttpApi
        from vallexd.server.static_child import StaticChild

        setup_logging(config.log_level)
        self.grace_s = config.grace_s
        self.service = RemoteService(config, replicas)
        self.child: StaticChild | None = None
        self.http: HttpApi | None = None
        await self.service.start()
        where = f"the static file server on {config.static_host}:{config.static_port}"
        try:
            if config.static_enabled:
                self.child = StaticChild(config.cache_dir, config.static_host, config.static_port)
                await self.child.start()
                self.service.static_base_url = self.child.base_url
            where = f"HTTP on {config.http_host}:{config.http_port}"
            self.http = HttpApi.from_config(self.service, config)
            await self.http.start()
        except (VallexError, OSError) as exc:
            await self.__del__()
            why = exc.message if isinstance(exc, VallexError) else (exc.strerror or str(exc))
            raise RuntimeError(f"{START_FAILED} ingress: cannot serve {where}: {why}") from None
        self.service.http_url = self.http.url

    async def url(self) -> str:
        assert self.http is not None
        return self.http.url

    async def drain(self, grace_s: float) -> None:
        """Stop taking requests (503 SHUTTING_DOWN) and wait up to `grace_s` for those in progress."""
        if self.http is not None:
            self.http.stop_accepting()
            await self.http.wait_idle(grace_s)

    async def __del__(self) -> None:
        if self.http is not None and not self.http.gate.draining:  # else _stop_app drained it already
            await self.drain(self.grace_s)
        if self.http is not None:
            await self.http.stop()
            self.http = None
        await self.service.stop()
        if self.child is not None:
            await self.child.stop()
            self.child = None


def build_app(config: Config) -> Any:
    """The bound Ray Serve application: Ingress(config, handle of Replica(config))."""
    from ray import serve

    # Ray must not kill a replica before its grace period is over (its default is 20 s).
    shutdown = {"graceful_shutdown_timeout_s": config.grace_s + 10}
    replica = serve.deployment(ReplicaDeployment, name=REPLICA_DEPLOYMENT, **replica_options(config),
                               **shutdown)
    ingress = serve.deployment(IngressDeployment, name=INGRESS_DEPLOYMENT, num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000, **shutdown)
    return ingress.bind(config, replica.bind(config))


def main(argv: Sequence[str] | None = None) -> int:
    """Start the application, print `vallexd-ray: READY <url>`, serve until SIGTERM or SIGINT.

    Exit codes: 0 stopped on a signal (also when the signal came before READY), 1 Ray or the
    application did not start (the cause is printed), 2 bad configuration or resources the local
    Ray instance does not have.
    """
    from vallexd.config.options import load_config
    from vallexd.errors import VallexError
    from vallexd.server.http_api import check_http_config

    try:
        config = load_config(sys.argv[1:] if argv is None else argv, prog="vallexd-ray",
                             description=DESCRIPTION)
        if config.http_port is None:
            raise ConfigError("the configuration", "http_port",
                              "vallexd-ray serves the HTTP API: set http_port (0 picks a free port)")
        check_http_config(config.http_host, config.http_token)
        replica_options(config)
    except VallexError as exc:
        return _fail(exc.message, EXIT_CONFIG)
    try:
        import ray
        from ray import serve
    except ImportError:
        return _fail("Ray Serve is not installed: pip install 'vallexd[ray]'", EXIT_CONFIG)

    if config.wyoming_uri:
        print("vallexd-ray: warning: wyoming_uri is ignored: vallexd-ray serves HTTP only", file=sys.stderr)
    unreachable = _unreachable(config.ray_address)
    if unreachable:
        return _fail(unreachable, EXIT_FAILURE)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # On the main thread: Ray binds its connection to the thread that opened it.
        ray.init(address=config.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    except Exception as exc:  # no cluster at that address, no room for the object store...
        return _fail(f"Ray did not start ({config.ray_address or 'a local instance'}): {exc}", EXIT_FAILURE)
    # Again after ray.init: Ray's core installs a crash handler for SIGTERM that would exit with 15.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if stop.is_set():
        ray.shutdown()
        return _stopped_early(deployed=False)
    try:
        missing = _missing_resources(config, ray.cluster_resources())
        if missing and config.ray_address is None:
            return _fail(missing, EXIT_CONFIG)
        if missing:
            print(f"vallexd-ray: warning: {missing}; waiting for the cluster to grow", file=sys.stderr)
        serve.start(proxy_location="Disabled")
        started, handle = _until(lambda: serve.run(build_app(config), name=APP_NAME, route_prefix=None),
                                 stop, APP_START_TIMEOUT_S)
        if not started:
            if stop.is_set():
                return _stopped_early(deployed=True, local=config.ray_address is None)
            cause = _start_failure(handle) if handle is not None else \
                f"not ready within {APP_START_TIMEOUT_S:.0f} s (the replicas' log above says why)"
            _stop_app(None, local=config.ray_address is None, grace_s=0, timeout_s=STOP_SLACK_S)
            return _fail(f"the application did not start: {cause}", EXIT_FAILURE)
        url = handle.url.remote().result()
        print(f"vallexd-ray: READY {url}", flush=True)
        stop.wait()
        print("vallexd-ray: stopping", flush=True)
        if not _stop_app(handle, local=config.ray_address is None, grace_s=config.grace_s,
                         timeout_s=config.grace_s + STOP_SLACK_S):
            print("vallexd-ray: Ray did not stop the application in time; leaving anyway", file=sys.stderr)
    finally:
        ray.shutdown()
    return EXIT_OK


DESCRIPTION = ("Serve vallexd's HTTP API from model replicas on Ray Serve (README: 'More than one GPU or "
               "machine'). Takes the daemon's options and configuration file; the socket, Wyoming and "
               "metrics options do not apply here.")
#: How long the application may take to start (every replica loading the model, maybe compiling).
APP_START_TIMEOUT_S = 1800.0
#: How long a cluster address may take to accept a connection.
CONNECT_TIMEOUT_S = 5.0
#: Beyond the grace period, how long Ray may take to stop the replicas before we give up on it.
STOP_SLACK_S = 30.0
#: Prefix of a start failure's message, so main can find it inside Ray's wrapped traceback.
START_FAILED = "VALLEXD_START_FAILED:"


def _fail(message: str, code: int) -> int:
    print(f"vallexd-ray: {message}", file=sys.stderr, flush=True)
    return code


def _until(call: Any, stop: threading.Event, timeout_s: float) -> tuple[bool, Any]:
    """Run a blocking Ray call in a thread while the main thread stays free for signals:
    (True, its result), or (False, the exception it raised / None if stopped or timed out)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except Exception as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="vallexd-ray-start", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and not stop.is_set() and time.monotonic() < deadline:
        thread.join(0.2)
    return outcome[0] if outcome else (False, None)


def _unreachable(address: str | None) -> str | None:
    """Why a HOST:PORT cluster address cannot be used (nothing listens there), else None; Ray
    itself would retry such an address for minutes. "auto" and a local instance are Ray's to check."""
    if not address or address == "auto" or "://" in address:
        return None
    host, _, port = address.rpartition(":")
    try:
        target = (host.strip("[]") or "127.0.0.1", int(port))
        with socket.create_connection(target, timeout=CONNECT_TIMEOUT_S):
            return None
    except ValueError:
        return f"ray_address {address!r} is not auto or HOST:PORT"
    except OSError as exc:
        return (f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one there with "
                "`ray start --head`, or leave ray_address unset for a local instance")


def _missing_resources(config: Config, cluster: dict[str, float]) -> str | None:
    """What the replicas need that the cluster does not have (CPUs, GPUs), or None."""
    options = replica_options(config)
    count = options.get("num_replicas") or options["autoscaling_config"]["initial_replicas"]
    for name, each in (("CPU", config.ray_replica_cpus), ("GPU", config.ray_replica_gpus)):
        need, have = count * each, cluster.get(name, 0.0)
        if need > have:
            return (f"{count} replica(s) x {each:g} {name}s = {need:g} {name}s, but the Ray cluster has "
                    f"{have:g}; lower ray_replicas or ray_replica_{name.lower()}s")
    return None


def _start_failure(exc: BaseException) -> str:
    """The replica's or ingress's own reason (in Ray's error, or in the deployment status that Ray
    keeps with the constructor's traceback), else the first line of Ray's error."""
    from ray import serve

    texts = [str(exc)]
    with contextlib.suppress(Exception):
        app = serve.status().applications.get(APP_NAME)
        if app is not None:
            texts += [app.message, *(d.message for d in app.deployments.values())]
    for text in texts:
        found = re.findall(re.escape(START_FAILED) + r" ?(.+)", text or "")
        if found:
            return found[-1].strip()
    return (str(exc).strip().splitlines() or ["unknown error"])[0]


def _stopped_early(*, deployed: bool, local: bool = False) -> int:
    """A signal before READY: exit 0; an application being deployed is deleted first (on a cluster
    too, or its actors would hold the port and the GPUs after we are gone)."""
    print("vallexd-ray: stopped before it was ready", file=sys.stderr, flush=True)
    if deployed:
        _stop_app(None, local=local, grace_s=0, timeout_s=STOP_SLACK_S)
    return EXIT_OK


def _stop_app(ingress: Any, *, local: bool, grace_s: float, timeout_s: float) -> bool:
    """Stop as the daemon does: the ingress first stops taking requests (new ones get 503
    SHUTTING_DOWN) and lets those in progress finish within `grace_s`; then the application is
    deleted (each replica's __del__ drains its service) and, on a local instance, Serve stopped.
    False if that took over `timeout_s` (e.g. Ray's own processes were killed by a signal to the
    whole process group, so Ray never answers)."""
    from ray import serve

    def stop() -> None:
        if ingress is not None:
            try:
                ingress.drain.remote(grace_s).result(timeout_s=grace_s + 5)
            except Exception as exc:  # requests in progress are cut off by the delete: say so
                print(f"vallexd-ray: warning: the ingress did not drain ({exc}); stopping anyway",
                      file=sys.stderr, flush=True)
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()

    thread = threading.Thread(target=stop, name="vallexd-ray-stop", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


if __name__ == "__main__":
    sys.exit(main())
