"""Prometheus metrics of one daemon, served at GET /metrics on the HTTP port (prometheus_client).

Its own `CollectorRegistry` (never the process-global one), so nothing else in the process
can add series, and tests can start many daemons' worth of metrics side by side.

Label values are bounded by construction: `transport` is one of TRANSPORTS, `method` one of
the names that transport registered with `allow()` (anything else counts as "other"), and
`outcome` is "ok" or an ErrorCode.  No client text, voice or preset name ever becomes a label.

Where the figures come from:

- requests: each transport calls `request(transport, method, error)` once per request;
- queue depth, running jobs, presets, cache size, model load time, cache hits/misses,
  coalesced requests, engine runs: read from the service at scrape time (`_ServiceCollector`);
- time to first audio, total synthesis time, real-time factor: `Service.on_record`, once per
  successful synthesize call;
- batch size per AR step and AR steps: `ModelWorker.on_step(batch_size)`, from the model
  thread, once per step (thread-safe: prometheus_client metrics take their own lock).
  AR steps per second = rate(vallexd_ar_steps_total[1m]); per busy second of the model:
  vallexd_ar_steps_total / vallexd_model_busy_seconds_total.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vallexd.errors import ErrorCode, VallexError

TRANSPORTS = ("rpc", "http", "wyoming")
OTHER = "other"
OUTCOMES = ("ok", *(code.value for code in ErrorCode))
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Seconds: from a cache hit (milliseconds) to a long text on a CPU (minutes).
_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_RTF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: The cache size needs a walk of the cache folder: refresh it at most this often.
CACHE_SCAN_INTERVAL_S = 30.0


class Metrics:
    """The daemon's metrics; `attach()` wires the service and worker hooks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)  # no scrape at registration
        self._allowed: dict[str, frozenset[str]] = {t: frozenset() for t in TRANSPORTS}
        self.requests = Counter(
            "vallexd_requests", "Requests handled, by transport, method and outcome (ok or the error code)",
            ["transport", "method", "outcome"], registry=self.registry)
        self.first_audio = Histogram(
            "vallexd_time_to_first_audio_seconds",
            "Seconds from a synthesis request to its first audio (cache: hit, miss, or shared = joined an "
            "identical request's model run)", ["cache"], buckets=_TIME_BUCKETS, registry=self.registry)
        self.synthesis = Histogram(
            "vallexd_synthesis_seconds", "Seconds a successful synthesis request took in total",
            ["cache"], buckets=_TIME_BUCKETS, registry=self.registry)
        self.rtf = Histogram(
            "vallexd_real_time_factor",
            "Seconds of work (text front end, queue, model) per second of audio, per model run; "
            "below 1 is faster than real time", buckets=_RTF_BUCKETS, registry=self.registry)
        self.batch = Histogram(
            "vallexd_batch_size", "Requests in each autoregressive model step", buckets=_BATCH_BUCKETS,
            registry=self.registry)
        self.steps = Counter("vallexd_ar_steps", "Autoregressive model steps", registry=self.registry)
        self._service: Any = None

    # ------------------------------------------------------------------ wiring
    def attach(self, service: Any) -> None:
        """Read gauges from `service` at scrape time and take its record and step hooks."""
        self._service = service
        self.registry.register(_ServiceCollector(service))
        service.on_record = self.record
        service.worker.on_step = self.step

    def allow(self, transport: str, methods: Iterable[str]) -> None:
        """The method names `transport` may report (anything else becomes "other")."""
        if transport not in self._allowed:
            raise ValueError(f"unknown transport {transport!r}")
        self._allowed[transport] = self._allowed[transport] | frozenset(methods)

    # ------------------------------------------------------------------ events
    def request(self, transport: str, method: str, error: VallexError | None) -> None:
        """Count one finished request; `method` outside the allowed set counts as "other"."""
        if transport not in self._allowed:
            transport = OTHER
        elif method not in self._allowed[transport]:
            method = OTHER
        outcome = "ok" if error is None else error.code.value
        self.requests.labels(transport, method, outcome).inc()

    def record(self, rec: Any) -> None:
        """Service.on_record: one successful synthesis (a `SynthesisRecord`)."""
        cache = "hit" if rec.cached else ("shared" if rec.coalesced else "miss")
        self.synthesis.labels(cache).observe(rec.total_s)
        if rec.first_audio_s is not None:
            self.first_audio.labels(cache).observe(rec.first_audio_s)
        if rec.model_s is not None and rec.audio_s > 0:
            self.rtf.observe(rec.model_s / rec.audio_s)

    def step(self, batch_size: int) -> None:
        """ModelWorker.on_step: one AR step over `batch_size` requests (model thread)."""
        self.steps.inc()
        self.batch.observe(batch_size)

    # ------------------------------------------------------------------ output
    def exposition(self) -> bytes:
        """The text format for a scrape (blocking: the cache size may need a folder walk)."""
        return generate_latest(self.registry)

    def summary(self) -> dict[str, Any]:
        """The main figures for `vallexctl status` (averages since start; None when no data)."""
        by_transport: dict[str, int] = {}
        errors = 0
        for sample in _samples(self.requests, "vallexd_requests_total"):
            transport = sample.labels["transport"]
            by_transport[transport] = by_transport.get(transport, 0) + int(sample.value)
            if sample.labels["outcome"] != "ok":
                errors += int(sample.value)
        worker = self._service.worker if self._service is not None else None
        busy = getattr(worker, "busy_s", 0.0) or 0.0
        steps = _total(self.steps, "vallexd_ar_steps_total")
        return {
            "requests": by_transport,
            "errors": errors,
            "time_to_first_audio_s": _mean(self.first_audio, "vallexd_time_to_first_audio_seconds"),
            "synthesis_s": _mean(self.synthesis, "vallexd_synthesis_seconds"),
            "real_time_factor": _mean(self.rtf, "vallexd_real_time_factor"),
            "ar_steps": int(steps),
            "ar_steps_per_busy_s": round(steps / busy, 1) if busy > 0 else None,
            "mean_batch_size": _mean(self.batch, "vallexd_batch_size"),
            "model_load_s": _round(getattr(worker, "load_s", None)),
        }


def _samples(metric: Any, name: str) -> Iterator[Any]:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == name:
                yield sample


def _total(metric: Any, name: str) -> float:
    return sum(s.value for s in _samples(metric, name))


def _mean(histogram: Any, base: str) -> float | None:
    count = _total(histogram, base + "_count")
    return round(_total(histogram, base + "_sum") / count, 3) if count else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class _ServiceCollector(Collector):
    """Figures read from the service when scraped (no bookkeeping of our own that could drift)."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self._lock = threading.Lock()
        self._cache: tuple[float, dict[str, Any]] | None = None

    def _cache_stats(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            if self._cache is None or now - self._cache[0] > CACHE_SCAN_INTERVAL_S:
                try:
                    stats = self.service.cache.stats()
                except OSError:
                    stats = {"files": 0, "bytes": 0}
                self._cache = (now, stats)
            return self._cache[1]

    def collect(self) -> Iterator[Metric]:
        service = self.service
        worker = service.worker
        counters = service.counters

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("vallexd_queue_depth", "Synthesis jobs waiting for the model", worker.queue_depth)
        yield gauge("vallexd_running_requests", "Synthesis jobs the model is working on", worker.in_flight)
        yield gauge("vallexd_requests_in_progress", "Synthesis requests in any stage (text, queue, model)",
                    service.active)
        yield gauge("vallexd_presets", "Installed voice presets", len(service.presets))
        load_s = worker.load_s
        yield gauge("vallexd_model_load_seconds", "Seconds the model took to load at start",
                    load_s if load_s is not None else float("nan"))
        yield counter("vallexd_model_busy_seconds", "Seconds the model thread spent on jobs", worker.busy_s)
        yield counter("vallexd_engine_runs", "Model runs started", worker.jobs_run)
        yield counter("vallexd_cache_hits", "Synthesis requests answered from the cache",
                      counters["cache_hits"])
        yield counter("vallexd_cache_misses", "Synthesis requests not in the cache", counters["cache_misses"])
        yield counter("vallexd_coalesced_requests",
                      "Cache misses that joined an identical request's model run instead of starting one",
                      service.coalesced)
        stats = self._cache_stats()
        yield gauge("vallexd_cache_bytes", f"Bytes of WAV files in the cache (refreshed at most every "
                                           f"{CACHE_SCAN_INTERVAL_S:g} s)", stats.get("bytes", 0))
        yield gauge("vallexd_cache_files", "WAV files in the cache (refreshed like vallexd_cache_bytes)",
                    stats.get("files", 0))
