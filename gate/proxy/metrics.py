"""The proxy's Prometheus metrics: defined in one place, in their own registry, with bounded labels."""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gate import __version__

OUTCOMES = ("forwarded", "rejected", "flagged", "error")
ERROR_REASONS = ("bad_request", "not_found", "too_large", "queue_full", "upstream_timeout", "upstream_error",
                 "unavailable", "internal")
STAGES = ("queue", "model", "total")

SCORE_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
SECONDS_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("backdoor_gate_proxy_requests", "Inference requests by outcome: forwarded "
                                "(served, nothing detected), rejected (refused, reject mode), flagged (served "
                                "although S(x) < tau: flag or shadow mode), error (not served).",
                                ["outcome"], registry=r)
        self.errors = Counter("backdoor_gate_proxy_errors", "Inference requests not served, by reason.",
                              ["reason"], registry=r)
        self.score = Histogram("backdoor_gate_proxy_score", "Shield score S(x) = min over reversed triggers of "
                               "KL(f(x) || f(stamped x)), per input image.", buckets=SCORE_BUCKETS, registry=r)
        self.duration = Histogram("backdoor_gate_proxy_request_duration_seconds", "Inference request time by "
                                  "stage: queue (waiting for the model), model (stamping, forward, scoring of "
                                  "the micro-batch), total (whole request in the proxy).", ["stage"],
                                  buckets=SECONDS_BUCKETS, registry=r)
        self.batch_images = Histogram("backdoor_gate_proxy_batch_images", "Input images per model call "
                                      "(micro-batch), before the stamped copies are added.",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("backdoor_gate_proxy_queue_depth", "Requests waiting for the model.", registry=r)
        self.threshold = Gauge("backdoor_gate_proxy_threshold", "Rejection threshold tau on S(x) (NaN when the "
                               "shield has no triggers).", registry=r)
        self.target_frr = Gauge("backdoor_gate_proxy_target_false_rejection_ratio", "False-rejection rate tau was "
                                "calibrated for on clean data (NaN when tau was set by hand).", registry=r)
        self.triggers = Gauge("backdoor_gate_proxy_triggers", "Reversed triggers the shield tests (flagged classes).",
                              registry=r)
        self.build = Info("backdoor_gate_proxy_build", "Version and configuration of the proxy.", registry=r)
        for o in OUTCOMES:
            self.requests.labels(o)
        for reason in ERROR_REASONS:
            self.errors.labels(reason)
        for s in STAGES:
            self.duration.labels(s)

    def describe(self, *, mode: str, upstream: str, model: str, threshold: float | None, target_frr: float | None,
                 triggers: int) -> None:
        self.build.info({"version": __version__, "python": platform.python_version(), "mode": mode,
                         "upstream": upstream, "model": model})
        self.threshold.set(float("nan") if threshold is None else threshold)
        self.target_frr.set(float("nan") if target_frr is None else target_frr)
        self.triggers.set(triggers)

    def error(self, reason: str) -> None:
        self.requests.labels("error").inc()
        self.errors.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
