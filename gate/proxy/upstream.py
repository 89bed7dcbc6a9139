"""Where the model runs for the proxy: in process (an ORT session through the oracle) or on any V2 server.

Both take a batch of model-format inputs, let the shield stamp it, run the stamped batch in ONE model call
and return the shield's :class:`gate.shield.Scored`. Stamping, ORT and scoring run in one worker thread,
never on the event loop (the thread also serialises use of the shield's stamping buffer).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from gate.errors import GateError
from gate.oracle import Oracle
from gate.proxy.codec import HEADER_LENGTH, TensorSpec, decode_infer_response, encode_infer_request
from gate.shield import Scored, Shield, oracle_forward


class UpstreamError(Exception):
    """The model failed or the upstream server answered with an error (HTTP 502)."""


class UpstreamTimeout(Exception):
    """The model did not answer in time (HTTP 504)."""


class EmbeddedModel:
    kind = "embedded"

    def __init__(self, oracle: Oracle, shield: Shield, timeout: float | None = None) -> None:
        self.oracle = oracle
        self.shield = shield
        self.timeout = timeout
        self._forward = oracle_forward(oracle)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gate-model")

    async def run(self, x: np.ndarray) -> Scored:
        fut = asyncio.get_running_loop().run_in_executor(self._executor, self.shield.run, x, self._forward)
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"the model did not answer within {self.timeout:g}s") from None
        except GateError as exc:
            raise UpstreamError(f"the model failed: {exc}") from None
        except Exception as exc:  # onnxruntime raises its own exception types
            raise UpstreamError(f"the model failed: {type(exc).__name__}: {str(exc).strip()[:300]}") from None

    def warm_up(self) -> None:
        """One call before serving: loads the stamping kernel and lets ORT allocate, so the first
        client does not wait for it."""
        zeros = np.zeros(self.oracle.spec.model_shape(1), np.float32)
        self._executor.submit(self.shield.run, zeros, self._forward).result()

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class RemoteModel:
    """A model served by another Open Inference Protocol (V2) server; the proxy is its client."""

    kind = "http"

    def __init__(self, url: str, model_name: str, model_input: TensorSpec, output_name: str, shield: Shield,
                 timeout: float | None = 30.0) -> None:
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.model_input = model_input
        self.output_name = output_name
        self.shield = shield
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gate-stamp")
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout,
                                         limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))

    def _prepare(self, x: np.ndarray) -> tuple[bytes, dict]:
        return encode_infer_request(self.model_input, self.shield.stamp(x), self.output_name)

    async def run(self, x: np.ndarray) -> Scored:
        body, headers = await asyncio.get_running_loop().run_in_executor(self._executor, self._prepare, x)
        try:
            r = await self._client.post(f"/v2/models/{self.model_name}/infer", content=body, headers=headers)
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"upstream {self.url} did not answer within {self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream {self.url} unreachable: {type(exc).__name__}: {exc}") from None
        if r.status_code != 200:
            try:
                msg = r.json().get("error", r.text)
            except Exception:
                msg = r.text[:200]
            raise UpstreamError(f"upstream {self.url} answered {r.status_code}: {msg}")
        try:
            raw = decode_infer_response(r.content, r.headers.get(HEADER_LENGTH), self.output_name)
            raw = raw.astype(np.float32)
            if not np.all(np.isfinite(raw)):
                raise ValueError("non-finite outputs")
            return self.shield.score(raw, len(x))
        except (ValueError, GateError) as exc:
            raise UpstreamError(f"upstream {self.url} sent an unusable response: {exc}") from None

    def check_metadata(self) -> str | None:
        """Compare the upstream's model metadata with the model file the shield was built for, at start-up.

        Raises GateError when the upstream answers but does not serve a matching model (no such model, no
        input of the same name, datatype and shape, or no such output). Returns a warning instead when the
        upstream cannot be reached yet (it may start after the proxy; readiness reports it meanwhile)."""
        where = f"upstream {self.url} model '{self.model_name}'"
        try:
            r = httpx.get(f"{self.url}/v2/models/{self.model_name}", timeout=min(self.timeout or 5.0, 5.0))
        except httpx.HTTPError as exc:
            return f"{where} not reachable at start-up ({type(exc).__name__}); its metadata is unchecked"
        if r.status_code != 200:
            raise GateError(f"{where}: metadata request answered {r.status_code}; is the model served there?")
        try:
            meta = r.json()
            inputs = {t["name"]: t for t in meta.get("inputs", [])}
            outputs = {t["name"] for t in meta.get("outputs", [])}
            shapes = {name: [int(v) for v in t.get("shape", [])] for name, t in inputs.items()}
        except (ValueError, TypeError, KeyError, AttributeError):
            raise GateError(f"{where}: metadata is not Open Inference Protocol model metadata") from None
        want = self.model_input
        got = inputs.get(want.name)
        if got is None:
            raise GateError(f"{where} has no input '{want.name}' (inputs: {sorted(inputs) or 'none'})")
        shape = shapes[want.name]
        fits = len(shape) == len(want.shape) and all(
            a == b or a == -1 or b == -1 for a, b in zip(shape, want.shape, strict=True))
        if got.get("datatype") != want.datatype or not fits:
            raise GateError(f"{where} input '{want.name}' is {got.get('datatype')} {shape}, the model file's is "
                            f"{want.datatype} {list(want.shape)}")
        if self.output_name not in outputs:
            raise GateError(f"{where} has no output '{self.output_name}' (outputs: {sorted(outputs) or 'none'})")
        return None

    def warm_up(self) -> None:
        """Load the stamping kernel before serving (the upstream warms its own model)."""
        self.shield.stamp(np.zeros((1, *self.model_input.shape[1:]), np.float32))

    async def ready(self) -> bool:
        try:
            r = await self._client.get(f"/v2/models/{self.model_name}/ready", timeout=2.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def close(self) -> None:
        await self._client.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
