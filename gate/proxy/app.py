"""The proxy as a thin ASGI app: Open Inference Protocol (KServe V2) REST in front of a shielded model.

Routes: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2`` (server metadata),
``GET /v2/models/{name}[/versions/{v}]`` (model metadata), ``GET .../ready``, ``POST .../infer``,
``GET /metrics`` (Prometheus).

HTTP statuses of an inference request:

====  =======================================================================================
200   served (in ``flag`` mode the response ``parameters`` carry backdoor_gate_flagged / _score)
400   malformed body (JSON nested deeper than ``codec.MAX_JSON_DEPTH``), unknown input/output, wrong
      datatype or shape, 'data' holding anything but numbers (true/false, strings, null), NaN/inf values,
      values outside the model's input range (what [0, 1] images encode to, ``codec.ValueRange``)
403   refused by the shield (``reject`` mode): the request is well formed but carries what looks
      like the backdoor trigger; body ``{"error": ..., "score": S}``. 403 ("understood, refused")
      rather than 422: the input is valid for the model, the server declines to serve it.
404   unknown model or version
413   body (after decompression) larger than ``max_request_bytes``
415   unsupported Content-Encoding
502   the model failed or the upstream V2 server answered with an error / is unreachable
503   queue full (with ``Retry-After``), or shutting down
504   the model / upstream did not answer within the upstream timeout
====  =======================================================================================
Every error body is ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from dataclasses import dataclass

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gate import __version__
from gate.proxy.batcher import MicroBatcher, QueueFull, ShuttingDown
from gate.proxy.codec import HEADER_LENGTH, ProtocolError, TensorSpec, encode_infer_response, parse_infer_request
from gate.proxy.metrics import Metrics
from gate.proxy.upstream import UpstreamError, UpstreamTimeout
from gate.shield import Shield

log = logging.getLogger("gate.proxy")

MODES = ("reject", "flag", "shadow")
SERVER_NAME = "backdoor-gate-proxy"
OFFLOAD_BYTES = 256 * 1024  # bodies larger than this are decoded in a worker thread, not on the event loop


@dataclass(frozen=True)
class ProxyConfig:
    model_name: str
    model_version: str = "1"
    mode: str = "reject"
    max_request_bytes: int = 16 * 1024 * 1024
    max_batch_size: int = 8
    max_queue_delay_us: int = 0
    max_queue: int = 1024
    target_frr: float | None = None  # what tau was calibrated for (exported as a metric, the alerts' baseline)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")


def error(status: int, message: str, **extra) -> JSONResponse:
    headers = {"retry-after": "1"} if status == 503 else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


_REASONS = {400: "bad_request", 404: "not_found", 413: "too_large", 415: "bad_request"}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed, refusing (413) more than ``limit`` bytes without reading them all."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise ProtocolError(413, f"request body of {int(length)} bytes exceeds the limit of {limit}")
        except ValueError:
            raise ProtocolError(400, f"invalid Content-Length {length!r}") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise ProtocolError(415, f"unsupported Content-Encoding {encoding!r} (gzip, deflate or none)")
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(400, f"cannot decompress the {encoding} body: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ProtocolError(413, f"decompressed request body exceeds the limit of {limit} bytes")
    return out


def create_app(shield: Shield, model, model_input: TensorSpec, model_output: TensorSpec, config: ProxyConfig,
               metrics: Metrics | None = None) -> Starlette:
    """``model``: an :class:`gate.proxy.upstream.EmbeddedModel` or ``RemoteModel`` (anything with async
    ``run(batch) -> Scored``, ``ready()`` and ``close()``)."""
    metrics = metrics or Metrics()
    batcher = MicroBatcher(model.run, max_batch_size=config.max_batch_size,
                           max_queue_delay_us=config.max_queue_delay_us, max_queue=config.max_queue,
                           on_depth=metrics.queue_depth.set, on_batch=metrics.batch_images.observe)
    mode = config.mode
    threshold = shield.threshold

    def known(request: Request) -> str | None:
        """An error message when the path names another model or version."""
        name = request.path_params["name"]
        version = request.path_params.get("version")
        if name != config.model_name:
            return f"unknown model '{name}' (this server serves '{config.model_name}')"
        if version is not None and version != config.model_version:
            return f"unknown version '{version}' of model '{name}' (available: {config.model_version})"
        return None

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        ok = await model.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_metadata(request: Request) -> Response:
        if (msg := known(request)) is not None:
            return error(404, msg)
        return JSONResponse({"name": config.model_name, "versions": [config.model_version],
                             "platform": "onnxruntime_onnx", "inputs": [model_input.metadata()],
                             "outputs": [model_output.metadata()]})

    async def model_ready(request: Request) -> Response:
        if (msg := known(request)) is not None:
            return error(404, msg)
        ok = await model.ready()
        return JSONResponse({"name": config.model_name, "ready": ok}, status_code=200 if ok else 503)

    async def infer(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            if (msg := known(request)) is not None:
                raise ProtocolError(404, msg)
            body = await read_body(request, config.max_request_bytes)
            header_length = request.headers.get(HEADER_LENGTH)
            if len(body) > OFFLOAD_BYTES:
                req = await asyncio.to_thread(parse_infer_request, body, header_length, model_input, model_output)
            else:
                req = parse_infer_request(body, header_length, model_input, model_output)
            answer = await batcher.submit(req.tensor)
        except ProtocolError as exc:
            metrics.error(_REASONS.get(exc.status, "bad_request"))
            return error(exc.status, exc.message)
        except QueueFull as exc:
            metrics.error("queue_full")
            return error(503, f"server busy: {exc}; retry later")
        except UpstreamTimeout as exc:
            metrics.error("upstream_timeout")
            return error(504, str(exc))
        except UpstreamError as exc:
            metrics.error("upstream_error")
            return error(502, str(exc))
        except ShuttingDown as exc:
            metrics.error("unavailable")
            return error(503, str(exc))

        scores = answer.scores
        parameters = None
        outcome = "forwarded"
        if shield.active:
            score = float(scores.min())
            for s in scores:
                metrics.score.observe(s)
            detected = bool(shield.rejects(scores).any())
            if detected:
                outcome = "rejected" if mode == "reject" else "flagged"
            if mode == "flag":
                parameters = {"backdoor_gate_flagged": detected, "backdoor_gate_score": score}
        metrics.duration.labels("queue").observe(answer.queue_seconds)
        metrics.duration.labels("model").observe(answer.model_seconds)
        metrics.requests.labels(outcome).inc()
        if outcome == "rejected":
            metrics.duration.labels("total").observe(time.perf_counter() - t0)
            return error(403, f"input refused by the backdoor gate: S(x) = {score:.4g} is below the "
                              f"threshold (stamping a reversed trigger barely changes the prediction, as for "
                              f"an input that already carries the trigger)", score=score)
        out = answer.raw
        if out.size > OFFLOAD_BYTES // 16:
            content, headers = await asyncio.to_thread(
                encode_infer_response, config.model_name, config.model_version, req.id, model_output, out,
                req.binary_output, parameters)
        else:
            content, headers = encode_infer_response(config.model_name, config.model_version, req.id,
                                                     model_output, out, req.binary_output, parameters)
        metrics.duration.labels("total").observe(time.perf_counter() - t0)
        return Response(content, headers=headers)

    async def prometheus(request: Request) -> Response:
        data, content_type = metrics.render()
        return Response(data, headers={"content-type": content_type})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error(exc.status_code, str(exc.detail))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error serving %s", request.url.path)
        if request.url.path.endswith("/infer"):
            metrics.error("internal")
        return error(500, f"internal error: {type(exc).__name__}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            await model.close()

    base = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/metrics", prometheus),
    ]
    for prefix in (base, versioned):
        routes += [Route(prefix, model_metadata), Route(prefix + "/ready", model_ready),
                   Route(prefix + "/infer", infer, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.shield = shield
    metrics.describe(mode=mode, upstream=model.kind, model=config.model_name,
                     threshold=threshold if shield.active else None, target_frr=config.target_frr,
                     triggers=shield.triggers)
    return app


def model_tensors(oracle, num_classes: int | None = None) -> tuple[TensorSpec, TensorSpec]:
    """The V2 description of an oracle's model: input (batch dimension -1, values in the range its input
    spec encodes [0, 1] images to) and output (-1, K)."""
    from gate.proxy.codec import ValueRange, v2_datatype

    spec = oracle.spec
    dims = spec.model_shape(1)[1:]
    inp = TensorSpec(oracle.input_name, v2_datatype(np.dtype(spec.dtype)), (-1, *dims), ValueRange.of(spec))
    out = TensorSpec(oracle.output_name, "FP32", (-1, int(num_classes or oracle.num_classes)))
    return inp, out
