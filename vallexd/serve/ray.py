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

import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from vallexd.config import Config
from vallexd.config.settings import ConfigError

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
        await self.server.start()

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
        await self.service.start()
        self.child: StaticChild | None = None
        if config.static_enabled:
            self.child = StaticChild(config.cache_dir, config.static_host, config.static_port)
            await self.child.start()
            self.service.static_base_url = self.child.base_url
        self.http = HttpApi.from_config(self.service, config)
        await self.http.start()
        self.service.http_url = self.http.url

    async def url(self) -> str:
        return self.http.url

    async def __del__(self) -> None:
        self.http.stop_accepting()
        await self.http.wait_idle(self.grace_s)
        await self.http.stop()
        await self.service.stop()
        if self.child is not None:
            await self.child.stop()


def build_app(config: Config) -> Any:
    """The bound Ray Serve application: Ingress(config, handle of Replica(config))."""
    from ray import serve

    replica = serve.deployment(ReplicaDeployment, name=REPLICA_DEPLOYMENT, **replica_options(config))
    ingress = serve.deployment(IngressDeployment, name=INGRESS_DEPLOYMENT, num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    return ingress.bind(config, replica.bind(config))


def main(argv: Sequence[str] | None = None) -> int:
    """Start the application, print `vallexd-ray: READY <url>`, serve until SIGTERM or SIGINT."""
    from vallexd.config.options import load_config
    from vallexd.errors import VallexError
    from vallexd.server.http_api import check_http_config

    try:
        config = load_config(sys.argv[1:] if argv is None else argv, prog="vallexd-ray")
        if config.http_port is None:
            raise ConfigError("the configuration", "http_port",
                              "vallexd-ray serves the HTTP API: set http_port (0 picks a free port)")
        check_http_config(config.http_host, config.http_token)
        replica_options(config)
    except VallexError as exc:
        print(f"vallexd-ray: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        import ray
        from ray import serve
    except ImportError:
        print("vallexd-ray: Ray Serve is not installed: pip install 'vallexd[ray]'", file=sys.stderr)
        return EXIT_CONFIG

    try:
        ray.init(address=config.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    except Exception as exc:  # no cluster at that address, no room for the object store...
        print(f"vallexd-ray: Ray did not start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    # After ray.init: Ray's core installs a crash handler for SIGTERM that would kill us uncleanly.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location="Disabled")
        try:
            handle = serve.run(build_app(config), name=APP_NAME, route_prefix=None)
        except Exception as exc:  # a replica or the ingress failed to start (model, port...)
            print(f"vallexd-ray: the application did not start: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        url = handle.url.remote().result()
        print(f"vallexd-ray: READY {url}", flush=True)
        stop.wait()
        print("vallexd-ray: stopping", flush=True)
        if not _stop_app(local=config.ray_address is None, timeout_s=config.grace_s + STOP_SLACK_S):
            print("vallexd-ray: Ray did not stop the application in time; leaving anyway", file=sys.stderr)
    finally:
        ray.shutdown()
    return EXIT_OK


#: Beyond the grace period, how long Ray may take to stop the replicas before we give up on it.
STOP_SLACK_S = 30.0


def _stop_app(*, local: bool, timeout_s: float) -> bool:
    """Delete the application (Ray Serve calls each replica's __del__: requests in progress finish
    within grace_s); on a local instance stop Serve too. False if that took over `timeout_s` (e.g.
    Ray's own processes were killed by a signal to the whole process group, so Ray never answers)."""
    from ray import serve

    def stop() -> None:
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()

    thread = threading.Thread(target=stop, name="vallexd-ray-stop", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


if __name__ == "__main__":
    sys.exit(main())
