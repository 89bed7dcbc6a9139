"""The door to a model served over the Open Inference Protocol (KServe V2 REST): Triton, KServe, MLServer,
``gate proxy --no-shield``. The only code in the gate that talks HTTP to a model server.

:class:`RemoteOracle` is :class:`gate.oracle.Oracle`'s sibling (both are :class:`gate.oracle.QueryOracle`):
the same queries, counting, budget and probabilities, so the scan cannot tell them apart and the model file
is never needed. What differs:

- **Spec.** The input comes from the server's model metadata (``GET /v2/models/NAME[/versions/V]``): one
  input of rank 4 (FP32, FP16 or FP64), one output with a score for every class; the spec flags (layout,
  range, mean/std, probs/logits) apply as for a file, and probabilities vs logits are probed the same way.
  An endpoint that answers labels or top-k only (an integer or string output, one value per image, the
  classification extension) is refused: a backdoor search needs every class's score.
- **Transport.** Requests and responses use the binary tensor data extension (the raw little-endian
  tensor after a JSON header), through NVIDIA's ``tritonclient.http``, the reference V2 client. A batch is
  split into requests of at most ``request_images`` images sent ``concurrency`` at a time, one client per
  worker thread (a tritonclient client is not thread safe).
- **Failures.** Connection errors, timeouts, HTTP 429 and 5xx are retried up to ``retries`` times after
  ``backoff * 2**attempt`` seconds (at most ``MAX_BACKOFF``, with jitter); any other answer (a 4xx, a
  malformed response) ends the query with a one-line :class:`gate.errors.ModelError`. Opening the
  endpoint retries 429/5xx (a server still loading) but not a refused connection: nothing listens there.
- **Rate.** ``max_qps`` caps the images sent per second (each request books its images' share of time).
- **Budget.** Images are counted before they are sent and a query that would pass ``max_queries`` is
  refused (:class:`gate.errors.QueryBudgetExceeded`), exactly as for a file; a re-sent request counts once,
  and the wire traffic (requests, images including re-sends and fixed-batch padding, retries, seconds) is
  in :meth:`RemoteOracle.describe` under ``transport``.

``describe()`` names the endpoint instead of a file: the model URL, name and version, the server's and the
model's metadata and ``endpoint_sha256``, the sha256 of their canonical JSON (what the attestation's
subject digest and a checkpoint's fingerprint use; it identifies what the server declares, not its weights).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import queue
import random
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from urllib.parse import urlsplit

import numpy as np

from gate.errors import ModelError, UsageError
from gate.oracle import QueryOracle, score_output, to_input_dtype
from gate.spec import SpecOverrides

INPUT_DATATYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "UINT8": np.uint8}
SCORE_DATATYPES = ("FP32", "FP16", "FP64")
REQUEST_BYTES = 4 * 1024 * 1024  # default request size: as many images as fit in this many input bytes ...
REQUEST_IMAGES = 256  # ... but at most this many
MAX_BACKOFF = 10.0  # seconds, the longest wait between two tries


class Transient(Exception):
    """A failure worth another try: the connection, a timeout, HTTP 429 or 5xx."""


def check_endpoint(url: str) -> str:
    """The base URL of a V2 server, without a trailing slash; a :class:`UsageError` for anything else.

    >>> check_endpoint("http://127.0.0.1:8000/")
    'http://127.0.0.1:8000'
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--remote must be an http(s) URL of a V2 server (http://HOST:PORT), got {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise UsageError(f"--remote takes no query, fragment or credentials: {url!r}")
    try:
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError:
        raise UsageError(f"--remote has an invalid port: {url!r}") from None
    return url.rstrip("/")


def model_url(url: str, model_name: str, model_version: str | None = None) -> str:
    """Where a V2 server serves a model (what the reports name instead of a file path).

    >>> model_url("http://h:8000", "demo", "2")
    'http://h:8000/v2/models/demo/versions/2'
    """
    return f"{url}/v2/models/{model_name}" + (f"/versions/{model_version}" if model_version else "")


def endpoint_facts(url: str) -> dict:
    """The model block of a report for a model URL that could not be opened: no metadata, no digest.

    >>> endpoint_facts("http://h:8000/v2/models/demo")
    {'path': 'http://h:8000/v2/models/demo', 'endpoint': 'http://h:8000', 'model_name': 'demo', 'model_version': None}
    """
    base, _, rest = url.partition("/v2/models/")
    name, _, version = rest.partition("/versions/")
    return {"path": url, "endpoint": base, "model_name": name, "model_version": version or None}


def canonical_sha256(doc) -> str:
    """sha256 of ``doc`` as sorted-key compact JSON (the bytes :func:`gate.report.attestation.canonical_json`
    gives for plain JSON)."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RateLimiter:
    """At most ``rate`` images per second: each send of ``n`` images books ``n / rate`` seconds, and waits
    until the time booked before it has passed. Safe to share between threads.

    >>> t = [0.0]
    >>> limiter = RateLimiter(100, clock=lambda: t[0], sleep=lambda s: t.__setitem__(0, t[0] + s))
    >>> for _ in range(3):
    ...     limiter.acquire(50)
    >>> t[0]  # the third send of 50 waited until 1 s: 100 images went in the first second
    1.0
    """

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self._clock, self._sleep = clock, sleep
        self._next: float | None = None
        self._lock = threading.Lock()

    def acquire(self, n: int) -> None:
        with self._lock:
            now = self._clock()
            start = now if self._next is None else max(now, self._next)
            self._next = start + n / self.rate
        if start > now:
            self._sleep(start - now)


class Workers:
    """``n`` daemon threads running submitted calls. Daemons, and :meth:`gather` waits in short slices, so that
    a request hanging on a dead server holds up neither Ctrl-C / SIGTERM (a signal's handler runs only when the
    main thread runs Python) nor the process's exit."""

    def __init__(self, n: int, name: str, on_exit: Callable[[], None] = lambda: None) -> None:
        self._on_exit = on_exit  # run in each thread as it stops (what it holds is its own to close)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to the waiting thread, which raises it
                    future.set_exception(exc)
        self._on_exit()

    @staticmethod
    def gather(futures: list[Future], abort: threading.Event) -> list:
        """The results in order; the first exception (or a KeyboardInterrupt while waiting) sets ``abort``,
        cancels what has not started and is raised."""
        try:
            while True:
                done, pending = wait(futures, timeout=0.2, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        raise f.exception()
                if not pending:
                    return [f.result() for f in futures]
        except BaseException:
            abort.set()
            for f in futures:
                f.cancel()
            raise

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


class RemoteOracle(QueryOracle):
    """Query-only access to an image classifier behind an Open Inference Protocol (V2) endpoint.

    ``url``: the server (``http://HOST:PORT``, or https, with an optional base path); ``model_name`` and
    ``model_version`` (empty: the server's choice) the model on it. ``max_batch``: images per scan call
    (as for a file); ``request_images``: images per HTTP request (default: what fits in ``REQUEST_BYTES``,
    at most ``REQUEST_IMAGES``, at most the server's Triton ``max_batch_size`` and ``max_qps``);
    ``concurrency``: requests in flight at once; ``max_qps``: images per second at most; ``retries``,
    ``backoff`` (seconds), ``timeout`` (seconds per request): see the module docstring.
    """

    def __init__(self, url: str, model_name: str, overrides: SpecOverrides | None = None, *,
                 model_version: str = "", max_batch: int = 4096, max_queries: int | None = None,
                 request_images: int | None = None, concurrency: int = 4, max_qps: float | None = None,
                 retries: int = 5, backoff: float = 0.5, timeout: float = 60.0) -> None:
        super().__init__(max_batch, max_queries)
        for name, value, least in (("concurrency", concurrency, 1), ("retries", retries, 0),
                                   ("max_batch", max_batch, 1)):
            if value < least:
                raise UsageError(f"{name} must be at least {least}, got {value}")
        if request_images is not None and request_images < 1:
            raise UsageError(f"images per request must be at least 1, got {request_images}")
        if max_qps is not None and not max_qps > 0:
            raise UsageError(f"--max-qps must be positive, got {max_qps}")
        if not timeout > 0 or not backoff >= 0:
            raise UsageError("the request timeout must be positive and the back-off 0 or more")
        if not model_name:
            raise UsageError("a remote model needs its name on the server (--model-name)")
        self.url = check_endpoint(url)
        self.model_name, self.model_version = model_name, str(model_version or "")
        self.path = model_url(self.url, model_name, self.model_version)
        self.concurrency, self.retries, self.backoff, self.timeout = int(concurrency), int(retries), backoff, timeout
        self.max_qps = max_qps
        self._limiter = RateLimiter(max_qps) if max_qps else None
        self._jitter = random.Random()  # spreads the retries of parallel requests; never touches the scan's rng
        self._local = threading.local()
        self._lock = threading.Lock()
        # every request runs in a worker, never in the caller; each worker has its own client
        self._workers = Workers(self.concurrency, "gate-remote", on_exit=self._close_client)
        self.stats = {"requests": 0, "images_sent": 0, "retries": 0, "seconds": 0.0}
        try:
            self._tc, self._tc_error = _tritonclient()
            self._open((overrides or SpecOverrides()).output_name)
            self.request_images = self._request_size(request_images)
            self.spec = self._resolve_spec(overrides or SpecOverrides())
            self._scale, self._offset = self.spec.affine()
        except BaseException:  # an endpoint that cannot be scanned leaves no threads behind
            self._workers.shutdown()
            raise

    # ------------------------------------------------------------------ opening and checking
    def _open(self, output_name: str | None) -> None:
        where = f"model '{self.model_name}' at {self.url}"
        self.server_metadata = self._ask(lambda c: c.get_server_metadata(), f"GET {self.url}/v2")
        self.metadata = self._ask(lambda c: c.get_model_metadata(self.model_name, self.model_version),
                                  f"GET {self.path}")
        try:
            config = self._ask(lambda c: c.get_model_config(self.model_name, self.model_version), "config",
                               retries=0)
            self._server_max_batch = int(config.get("max_batch_size") or 0)
        except (ModelError, TypeError, ValueError, AttributeError):  # only Triton has /config: optional
            self._server_max_batch = 0
        meta = self.metadata if isinstance(self.metadata, dict) else {}
        inputs, outputs = meta.get("inputs"), meta.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            raise ModelError(f"{where}: the metadata has no inputs and outputs lists (not a V2 model?)")
        tensors = [_tensor(t, where) for t in inputs + outputs]
        ins, outs = tensors[:len(inputs)], tensors[len(inputs):]
        if len(ins) != 1:
            raise ModelError(f"model must have exactly one input, found {len(ins)}: {[t[0] for t in ins]}")
        self.input_name, datatype, shape = ins[0]
        self.input_shape = shape
        if len(shape) != 4:
            raise ModelError(f"model input must be rank 4 (a batch of images), got shape {shape}")
        if datatype not in INPUT_DATATYPES:
            raise ModelError(f"unsupported input datatype {datatype}; supported: FP32, FP16, FP64, UINT8")
        self._datatype, self._dtype = datatype, INPUT_DATATYPES[datatype]
        scores = [(n, dt, shape, dt in SCORE_DATATYPES) for n, dt, shape in outs]
        self.output_name, _, out_shape, _ = score_output(scores, where, output_name)
        self._declared_classes = out_shape[1] if out_shape[1] > 0 else None
        self.sha256 = canonical_sha256({"url": self.path, "server": self.server_metadata, "model": self.metadata})
        server = self.server_metadata if isinstance(self.server_metadata, dict) else {}
        self.providers = [f"remote: {server.get('name', 'V2 server')} {server.get('version', '')}".strip()]

    def _request_size(self, wanted: int | None) -> int:
        """Images per request (from the input shape: it is needed before the spec's probe queries)."""
        if self.input_shape[0] > 0:  # a fixed batch: every request carries exactly that many images
            return self.input_shape[0]
        image_bytes = math.prod(max(1, d) for d in self.input_shape[1:]) * np.dtype(self._dtype).itemsize
        size = wanted or max(1, min(REQUEST_IMAGES, REQUEST_BYTES // image_bytes))
        if self._server_max_batch > 0:
            size = min(size, self._server_max_batch)
        if self.max_qps is not None:  # no single request larger than a second's worth
            size = min(size, max(1, int(self.max_qps)))
        return size

    # ------------------------------------------------------------------ the transport
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            parts = urlsplit(self.url)
            client = self._tc.InferenceServerClient(parts.netloc + parts.path, ssl=parts.scheme == "https",
                                                    connection_timeout=self.timeout, network_timeout=self.timeout)
            self._local.client = client
        return client

    def _close_client(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            self._local.client = None
            try:
                client.close()
            except Exception:
                pass

    def _ask(self, fn, what: str, retries: int | None = None):
        """``fn(client)`` at opening time (a refused connection is not retried), in a worker thread."""
        abort = threading.Event()
        return Workers.gather([self._workers.submit(self._call, fn, what, True, retries, abort)], abort)[0]

    def _call(self, fn, what: str, opening: bool = False, retries: int | None = None,
              abort: threading.Event | None = None):
        """``fn(client)``, tried again after transient failures; a one-line ModelError when it cannot be done."""
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return self._once(fn, opening)
            except Transient as exc:
                if attempt == retries or (abort is not None and abort.is_set()):
                    tries = f" (gave up after {attempt + 1} tries)" if attempt else ""
                    raise ModelError(f"{what}: {exc}{tries}") from None
                with self._lock:
                    self.stats["retries"] += 1
                delay = min(MAX_BACKOFF, self.backoff * 2 ** attempt) * self._jitter.uniform(0.5, 1.0)
                if abort is not None:
                    abort.wait(delay)
                else:
                    time.sleep(delay)
            except ModelError as exc:
                raise ModelError(f"{what}: {exc}") from None
        raise AssertionError("unreachable")

    def _once(self, fn, opening: bool):
        """One try: ``Transient`` for what another try may cure, ``ModelError`` for what it will not."""
        try:
            return fn(self._client())
        except self._tc_error as exc:
            status = exc.status()
            message = " ".join(str(exc.message() or exc).split())[:300]
            code = int(status) if status and str(status).isdigit() else None
            if code is not None and (code >= 500 or code == 429):
                raise Transient(f"the server answered HTTP {code}: {message}") from None
            if code is None:
                raise ModelError(f"unusable answer from the server: {message}") from None
            raise ModelError(f"the server answered HTTP {code}: {message}") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, closed mid-answer
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, socket.gaierror) or (opening and isinstance(exc, ConnectionRefusedError)):
                raise ModelError(f"cannot reach the model server: {text}") from None
            raise Transient(f"the connection failed: {text}") from None

    def _infer(self, chunk: np.ndarray, abort: threading.Event) -> np.ndarray:
        """The raw output of one request (``chunk``: images in the model's format and dtype), checked."""
        tc = self._tc

        def send(client):
            inp = tc.InferInput(self.input_name, list(chunk.shape), self._datatype)
            inp.set_data_from_numpy(chunk, binary_data=True)
            out = tc.InferRequestedOutput(self.output_name, binary_data=True)
            return client.infer(self.model_name, [inp], model_version=self.model_version, outputs=[out])

        def attempt(client):
            if self._limiter is not None:
                self._limiter.acquire(len(chunk))
            with self._lock:
                self.stats["requests"] += 1
                self.stats["images_sent"] += len(chunk)
            return send(client)

        result = self._call(attempt, f"POST {self.path}/infer", abort=abort)
        try:
            raw = result.as_numpy(self.output_name)
        except Exception as exc:  # tritonclient's parsing raises KeyError, ValueError, ... for bad bodies
            raise ModelError(f"model '{self.model_name}' at {self.url} sent an unusable response: "
                             f"{type(exc).__name__}: {exc}") from None
        if raw is None:
            raise ModelError(f"model '{self.model_name}' at {self.url} answered without output '{self.output_name}'")
        raw = np.asarray(raw)
        k = self._declared_classes
        if raw.dtype.kind != "f" or raw.ndim != 2 or raw.shape[1] < 2 or (k is not None and raw.shape[1] != k):
            raise ModelError(f"model '{self.model_name}' at {self.url} answered {raw.dtype} {list(raw.shape)} for "
                             f"{len(chunk)} images, not a score for each of {k or 'its'} classes: a server that "
                             f"gives only labels or top-k cannot be scanned")
        if raw.shape[0] != len(chunk):
            raise ModelError(f"model '{self.model_name}' at {self.url} answered {raw.shape[0]} rows for "
                             f"{len(chunk)} images")
        return raw

    def _run_raw(self, batch: np.ndarray) -> np.ndarray:
        """Raw outputs of an encoded batch: split into requests, ``concurrency`` of them in flight, in order."""
        batch = to_input_dtype(batch, self._dtype)
        size, fixed = self.request_images, self.spec.batch is not None
        chunks = []
        for i in range(0, len(batch), size):
            chunk = batch[i:i + size]
            if fixed and len(chunk) < size:  # pad the last request up to the fixed batch size
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
            chunks.append((chunk, min(size, len(batch) - i)))
        abort = threading.Event()
        t0 = time.perf_counter()
        try:
            raws = Workers.gather([self._workers.submit(self._infer, c, abort) for c, _ in chunks], abort)
            outs = [raw[:n] for raw, (_, n) in zip(raws, chunks, strict=True)]
        finally:
            seconds = time.perf_counter() - t0
            self.ort_seconds += seconds
            self.stats["seconds"] += seconds
        if not outs:
            return np.zeros((0, self._declared_classes or 0), np.float32)
        return self._checked(np.concatenate(outs) if len(outs) != 1 else outs[0])

    def close(self) -> None:
        """Stop the workers (each closes its connections); the oracle answers no more queries."""
        self._workers.shutdown()

    def describe(self) -> dict:
        return {
            "path": self.path,
            "endpoint": self.url,
            "model_name": self.model_name,
            "model_version": self.model_version or None,
            "endpoint_sha256": self.sha256,
            "server": self.server_metadata,
            "metadata": self.metadata,
            "input_name": self.input_name,
            "input_shape": list(self.input_shape),
            "output_name": self.output_name,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "transport": {"protocol": "Open Inference Protocol v2, binary tensor data", "client": "tritonclient.http",
                          "request_images": self.request_images, "concurrency": self.concurrency,
                          "max_qps": self.max_qps, **self.stats},
        }


def _tritonclient():
    """(tritonclient.http, its exception type), imported only when a remote model is scanned."""
    try:
        import tritonclient.http as tc
        from tritonclient.utils import InferenceServerException
    except ImportError as exc:
        raise ModelError(f"scanning a remote model needs tritonclient[http] (pip install 'tritonclient[http]'): "
                         f"{exc}") from None
    return tc, InferenceServerException


def _tensor(t, where: str) -> tuple[str, str, list[int]]:
    """(name, datatype, shape) of one tensor of V2 model metadata; -1 marks a dynamic dimension."""
    if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("datatype"), str):
        raise ModelError(f"{where}: a tensor in the metadata has no name or datatype: {str(t)[:120]}")
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ModelError(f"{where}: tensor '{t['name']}' has no integer shape in the metadata: {str(shape)[:60]}")
    return t["name"], t["datatype"], shape
