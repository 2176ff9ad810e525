"""``/metrics``: Prometheus text format (prometheus-client), one registry
per server."""

from __future__ import annotations

from typing import Callable, Iterable, Tuple

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

disable_created_metrics()  # (no *_created series: timestamps nobody asked for)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Live:
    """Gauges read when scraped: runs by state and host, silent runs, SSH
    connections, event-stream clients."""

    def __init__(self, counts: Callable[[], Iterable[Tuple[str, str, int]]],
                 silent: Callable[[], Iterable[Tuple[str, int]]], ssh: Callable[[], int],
                 clients: Callable[[], int]):
        self.counts, self.silent, self.ssh, self.clients = counts, silent, ssh, clients

    def collect(self):
        runs = GaugeMetricFamily("chaperone_runs", "Recorded runs by state and host.", labels=["state", "host"])
        for host, state, n in self.counts():
            runs.add_metric([state, host], n)
        yield runs
        silent = GaugeMetricFamily("chaperone_runs_silent",
                                   "Unfinished runs whose host has not been heard from for too long.",
                                   labels=["host"])
        for host, n in self.silent():
            silent.add_metric([host], n)
        yield silent
        yield GaugeMetricFamily("chaperone_ssh_connections", "SSH connections open now (calls and tunnels).",
                                value=self.ssh())
        yield GaugeMetricFamily("chaperone_event_clients", "Clients following /api/events or an output now.",
                                value=self.clients())


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.callbacks = Counter("chaperone_callbacks", "Agent callbacks answered, by kind and status.",
                                 ["kind", "status"], registry=self.registry)
        self.callbacks_rejected = Counter("chaperone_callbacks_rejected",
                                          "Agent callbacks refused (HTTP status 400 and up but 409).",
                                          ["status"], registry=self.registry)
        self.output_bytes = Counter("chaperone_output_bytes", "Output bytes delivered into the mirror.",
                                    ["stream"], registry=self.registry)
        self.catch_ups = Counter("chaperone_catch_ups", "Catch-ups from a spool over the host's transport.",
                                 ["result"], registry=self.registry)
        self.api_requests = Counter("chaperone_api_requests", "Requests to the local API, by status.",
                                    ["status"], registry=self.registry)

    def live(self, **sources) -> None:
        self.registry.register(_Live(**sources))

    def render(self) -> bytes:
        return generate_latest(self.registry)
