"""The single door to the vendor model: an ONNX Runtime session used as a black box.

Everything else in the gate queries the model through :class:`Oracle`. It validates the ONNX file,
resolves the input contract (:mod:`gate.spec`), counts every image it sends (``queries``), enforces an
optional hard query budget, and always answers with class probabilities.

:class:`QueryOracle` is what every oracle shares (the spec, encoding, counting, the budget, probabilities
from raw outputs); :class:`gate.remote_oracle.RemoteOracle` is its sibling for a model behind an Open
Inference Protocol endpoint.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from gate.errors import ModelError, QueryBudgetExceeded
from gate.spec import InputSpec, SpecOverrides, broadcast_channels, check_channels, resolve_layout

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_INPUT_DTYPES = {**_DTYPES, "tensor(uint8)": np.uint8}  # uint8: whole pixel values 0-255, normalised inside


def to_input_dtype(batch: np.ndarray, dtype) -> np.ndarray:
    """An encoded batch (float, in the model's range) as the model's input dtype: a uint8 input gets the nearest
    whole pixel values, clipped to 0-255 (a stamped float pixel is rounded as an image file would round it)."""
    if np.dtype(dtype) == np.uint8:
        return np.clip(np.rint(batch), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(batch, dtype=dtype)


def _ort():
    import onnxruntime as ort

    # Severity 4 (fatal only): onnxruntime-gpu otherwise logs CUDA-library errors on machines without a GPU.
    ort.set_default_logger_severity(4)
    return ort


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


# -log of this is the loss of a class whose probability the model gave as exactly 0 (what float32 can hold,
# rounded): such rows carry no signal for the search, which is why logits are kept as log-softmax below.
PROB_FLOOR = 1e-37
# On the CPU a batch goes out as this many chunks per concurrent call, taken by the ``calls`` worker threads as
# each finishes its last: when the main thread (stamping, NumPy) preempts one worker, the other takes more
# chunks instead of idling at the end of an even split. Measured on the 43-class demo scan (2 cores, farm-bench
# -n 3, same report): 4 chunks 0.91x the wall time of 1 (35.7 s vs 40.2 s); 8 chunks 0.985x of 4 (noise).
CHUNKS_PER_CALL = 4


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p from logits without underflow: a class 200 logits behind still gets a finite, ordered value."""
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
    z -= lse
    return z


def looks_like_probs(out: np.ndarray, tol: float = 1e-3) -> bool:
    return bool(out.min() >= -tol and out.max() <= 1 + tol and np.allclose(out.sum(axis=1), 1.0, atol=tol))


def score_output(outputs: list[tuple[str, str, list, bool]], where: str, stated: str | None = None) -> tuple:
    """The output that gives a score per class, of ``outputs`` as (name, type, shape, floating point) each.

    ``stated`` (``--output-name``) picks one by name; otherwise the one floating-point output of shape (batch,
    classes), classes not 1 (labels, top-1 scores and embeddings of another width are not it). Several of the
    same class count (logits beside probabilities) are one model's scores: the first is taken. Several of
    different counts (an embedding beside the logits) must be named: a wrong choice would scan the wrong thing."""
    listed = ", ".join(f"'{n}' {t} {list(s)}" for n, t, s, _ in outputs) or "none"

    def is_score(o) -> bool:
        return o[3] and len(o[2]) == 2 and o[2][1] != 1

    if stated is not None:
        named = [o for o in outputs if o[0] == stated]
        if not named:
            raise ModelError(f"{where} has no output '{stated}' (outputs: {listed})")
        if not is_score(named[0]):
            raise ModelError(f"{where}: output '{stated}' {named[0][1]} {list(named[0][2])} is not a score per "
                             f"class (a floating-point output of shape (batch, classes))")
        return named[0]
    scores = [o for o in outputs if is_score(o)]
    single = [o for o in outputs if o[3] and len(o[2]) == 2 and o[2][1] == 1]
    if not scores and single:
        name, _, shape, _ = single[0]
        raise ModelError(f"{where} gives no score for every class: output '{name}' {list(shape)} has one "
                         f"score per image (a top-1 score, or a one-class model); a model that answers only labels or "
                         f"top-k cannot be scanned, and a backdoor scan needs at least 2 classes")
    if not scores:
        raise ModelError(f"{where} gives no score for every class (outputs: {listed}): a model that answers only "
                         f"labels or top-k cannot be scanned; it needs its probabilities or logits, (batch, classes)")
    widths = {o[2][1] for o in scores}
    if len(scores) > 1 and (len(widths) > 1 or not all(isinstance(w, int) and w > 0 for w in widths)):
        raise ModelError(f"{where} has several score outputs of different widths ({listed}); name the one that "
                         f"gives the class scores with --output-name")
    return scores[0]


class QueryOracle:
    """Query-only access to an image classifier: what every oracle shares.

    A subclass opens its model, setting ``input_shape`` (rank 4), ``_dtype`` (the input's numpy dtype) and
    ``_declared_classes`` (None when the output does not say), then calls :meth:`_resolve_spec`; it
    implements :meth:`_run_raw` (raw outputs of an encoded batch, uncounted) and :meth:`describe`.
    ``max_queries``: hard budget on images sent; exceeding it raises :class:`QueryBudgetExceeded`.
    """

    on_cuda = False
    overrides = SpecOverrides()  # what the user stated about the input; set by :meth:`_resolve_spec`

    def __init__(self, max_batch: int, max_queries: int | None) -> None:
        self.max_batch = int(max_batch)
        self.max_queries = None if max_queries is None else int(max_queries)
        self.queries = 0
        self.ort_seconds = 0.0  # seconds spent waiting for the model's answers

    def _resolve_spec(self, o: SpecOverrides) -> InputSpec:
        layout, h, w, c, layout_detected = resolve_layout(self.input_shape, o.layout, o.size)
        self.overrides = o
        check_channels(o.mean, c, "mean")
        check_channels(o.std, c, "std")
        b = self.input_shape[0]
        batch = b if isinstance(b, int) and b > 0 else None
        detected = ["layout"] if layout_detected else []
        value_range = float(o.value_range or 1.0)
        if np.dtype(self._dtype) == np.uint8:  # whole pixel values: [0, 255], any normalisation inside the model
            if o.value_range not in (None, 255.0):
                raise ModelError(f"the model takes uint8 pixels (0-255): an input range of {o.value_range:g} cannot "
                                 f"apply")
            if o.mean is not None:
                raise ModelError("the model takes uint8 pixels (0-255): a mean/std cannot apply (it normalises inside)")
            value_range = 255.0
            if o.value_range is None:
                detected.append("value_range")
        spec = InputSpec(
            layout=layout, height=h, width=w, channels=c,
            value_range=value_range,
            mean=broadcast_channels(o.mean, c), std=broadcast_channels(o.std, c),
            output_kind=o.output_kind or "probs", batch=batch,
            dtype=np.dtype(self._dtype).name, detected=tuple(detected),
        )
        self.spec = spec
        self._scale, self._offset = spec.affine()
        if o.output_kind is None:
            spec = self._probe_output_kind(spec)
        return spec

    def _probe_output_kind(self, spec: InputSpec) -> InputSpec:
        """Send a few random images and look at the raw outputs: rows on the simplex mean probabilities."""
        rng = np.random.default_rng(0)
        probe = rng.random((8, *spec.image_shape), dtype=np.float32)
        self.charge(len(probe))
        raw = self._run_raw(self.encode(probe))
        kind = "probs" if looks_like_probs(raw) else "logits"
        return replace(spec, output_kind=kind, detected=spec.detected + ("output_kind",))

    def with_spec(self, overrides: SpecOverrides) -> Oracle:
        """The same session under another input spec (``gate inspect`` tries the common conventions on it);
        the copy counts its own queries."""
        other = copy.copy(self)
        other.queries = 0
        other.spec = other._resolve_spec(overrides)
        other._scale, other._offset = other.spec.affine()
        return other

    # ------------------------------------------------------------------ queries
    @property
    def num_classes(self) -> int:
        if self._declared_classes is None:
            self._declared_classes = int(self.probs(np.zeros((1, *self.spec.image_shape), np.float32)).shape[1])
        return self._declared_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.spec.image_shape

    @property
    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset) per channel, for kernels that encode while they stamp."""
        return self._scale, self._offset

    @property
    def remaining(self) -> int | None:
        return None if self.max_queries is None else self.max_queries - self.queries

    def charge(self, n: int) -> None:
        """Count ``n`` images as sent; refuse before the budget would be exceeded."""
        if self.max_queries is not None and self.queries + n > self.max_queries:
            raise QueryBudgetExceeded(
                f"query budget exhausted: {self.queries} of {self.max_queries} images used, {n} more needed")
        self.queries += n

    def encode(self, images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float NHWC [0,1] images -> the model's layout, range, normalisation and dtype."""
        x = np.asarray(images, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self.spec.image_shape:
            raise ModelError(f"images of shape {x.shape[1:]} do not match the model input {self.spec.image_shape}")
        y = x * self._scale + self._offset
        if self.spec.channels_first:
            y = y.transpose(0, 3, 1, 2)
        if out is None:
            return to_input_dtype(y, self._dtype)
        out[...] = y
        return out

    def run_encoded(self, batch: np.ndarray, log: bool = False) -> np.ndarray:
        """Probabilities (N, K) float32 for a batch already in the model's input format; with ``log``
        log-probabilities (see :meth:`_to_scores`)."""
        self.charge(len(batch))
        raw = self._run_raw(batch)
        return self._to_scores(raw, log)

    def run_raw(self, batch: np.ndarray) -> np.ndarray:
        """The model's own outputs (probabilities or logits, as it gives them) for an encoded batch; counted."""
        self.charge(len(batch))
        return self._run_raw(batch)

    def probs(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) for float NHWC [0,1] images, in chunks of ``max_batch``."""
        images = np.asarray(images)
        self.charge(len(images))
        outs = [self._run_raw(self.encode(images[i:i + self.max_batch]))
                for i in range(0, len(images), self.max_batch)]
        return self._to_probs(np.concatenate(outs) if outs else np.zeros((0, self.num_classes), np.float32))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.probs(images).argmax(axis=1)

    def _to_probs(self, raw: np.ndarray) -> np.ndarray:
        raw = raw.astype(np.float32, copy=False)
        if self.spec.output_kind == "logits":
            return softmax(raw.copy())
        return raw

    def _to_scores(self, raw: np.ndarray, log: bool) -> np.ndarray:
        """Probabilities, or with ``log`` log-probabilities: log-softmax of logits (finite however far
        behind a class is), the log of probabilities floored at ``PROB_FLOOR`` (an exact 0 says nothing)."""
        if not log:
            return self._to_probs(raw)
        raw = raw.astype(np.float32, copy=False)
        if self.spec.output_kind == "logits":
            return log_softmax(raw.copy())
        return np.log(np.maximum(raw, np.float32(PROB_FLOOR)))

    def _run_raw(self, batch: np.ndarray) -> np.ndarray:
        """Raw model outputs (N, K) for an encoded batch; not counted (the public methods count)."""
        raise NotImplementedError

    @staticmethod
    def _checked(raw: np.ndarray) -> np.ndarray:
        if raw.ndim != 2:
            raise ModelError(f"model output must be rank 2 (batch, classes), got shape {raw.shape}")
        if not np.all(np.isfinite(raw)):
            raise ModelError("model returned non-finite outputs (NaN or inf)")
        return raw

    def describe(self) -> dict:
        raise NotImplementedError


def host_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Oracle(QueryOracle):
    """Query-only access to an ONNX image classifier.

    ``device``: "auto" (CUDA when ORT really gets it, else CPU), "cpu" or "cuda".
    ``max_queries``: hard budget on images sent; exceeding it raises :class:`QueryBudgetExceeded`.
    ``threads``: onnxruntime's intra-op threads (0: its default, one per core).
    ``calls``: on the CPU, each batch is split into this many parts answered at once, each by one onnxruntime
    thread (intra-op 1 unless ``threads`` says otherwise); 1: one call, parallel inside. A scan stamps the
    next images while the model answers: beside ORT's own parallel ops the stamping thread stalls one of their
    threads and the whole op waits for it, while separate single-thread calls just share the cores
    (bench/RESULTS.md, "Scan speed": 7 % more queries/s on 2 cores). ``InferenceSession.run`` is thread-safe,
    and the outputs do not depend on how a batch is split (tested). On a GPU ``calls`` changes nothing.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        overrides: SpecOverrides | None = None,
        *,
        device: str = "auto",
        max_batch: int = 4096,
        max_queries: int | None = None,
        threads: int = 0,
        calls: int = 1,
    ) -> None:
        super().__init__(max_batch, max_queries)
        if calls < 1:
            raise ValueError(f"calls must be at least 1, got {calls}")
        self.path = Path(path)
        overrides = overrides or SpecOverrides()
        self.calls = int(calls)
        self._pool: ThreadPoolExecutor | None = None
        self._open(device, threads, overrides.output_name)
        self.spec = self._resolve_spec(overrides)
        self._scale, self._offset = self.spec.affine()

    # ------------------------------------------------------------------ opening and checking
    def _open(self, device: str, threads: int, output_name: str | None) -> None:
        import onnx

        if self.path.is_dir():
            raise ModelError(f"model path is a directory, not an ONNX file: {self.path}")
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}")
        try:
            model = onnx.load(str(self.path))
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:  # onnx raises DecodeError, ValidationError, ... for broken files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.path} is not a valid ONNX model: {first}") from None
        self.sha256 = file_sha256(self.path)
        graph_inputs = {i.name for i in model.graph.initializer}
        real_inputs = [i for i in model.graph.input if i.name not in graph_inputs]
        if len(real_inputs) != 1:
            raise ModelError(f"model must have exactly one input, found {len(real_inputs)}: "
                             f"{[i.name for i in real_inputs]}")
        del model

        ort = _ort()
        wanted = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        # calls split CPU batches only: on a GPU the CPU-side ops keep onnxruntime's own threads, on the CPU each of
        # the calls gets one thread. A session that asked for CUDA is built for the GPU (loading the model on the GPU
        # once); onnxruntime-gpu lists CUDA even with no GPU, so what counts is what the session really got, and a
        # CUDA session that fell back to the CPU is rebuilt (cheap there) with the CPU calls' one thread.
        cpu_threads = threads or (1 if self.calls > 1 else 0)
        self.session = self._session(ort, wanted, threads if len(wanted) > 1 else cpu_threads)
        self.providers = list(self.session.get_providers())
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        if len(wanted) > 1 and not self.on_cuda and cpu_threads != threads:
            self.session = self._session(ort, wanted, cpu_threads)
            self.providers = list(self.session.get_providers())
        if device == "cuda" and not self.on_cuda:
            raise ModelError("device 'cuda' requested but onnxruntime could not use a CUDA GPU")

        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        if len(self.input_shape) != 4:
            raise ModelError(f"model input must be rank 4 (a batch of images), got shape {self.input_shape}")
        if inp.type not in _INPUT_DTYPES:
            raise ModelError(f"unsupported input dtype {inp.type}; supported: float32, float16, float64, uint8")
        self._dtype = _INPUT_DTYPES[inp.type]
        outputs = [(o.name, o.type, list(o.shape), o.type in _DTYPES) for o in self.session.get_outputs()]
        self.output_name, _, out_shape, _ = score_output(outputs, f"model {self.path.name}", output_name)
        self._declared_classes = out_shape[1] if isinstance(out_shape[1], int) and out_shape[1] > 0 else None

    def _session(self, ort, providers: list[str], threads: int):
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        # No busy-waiting between runs: the stamping kernels run on the same cores right after each call.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            return ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load {self.path}: {str(exc).splitlines()[0]}") from None

    def _run_raw(self, batch: np.ndarray) -> np.ndarray:
        """Raw model outputs; splits into the model's fixed batch size when it has one."""
        if batch.dtype != self._dtype:
            batch = to_input_dtype(batch, self._dtype)
        fixed = self.spec.batch
        t0 = time.perf_counter()
        if fixed is None:
            size = (min(self.max_batch, -(-len(batch) // (self.calls * CHUNKS_PER_CALL))) if self._splits
                    else self.max_batch)
            outs = self._each([batch[i:i + size] for i in range(0, len(batch), size)])
        else:
            chunks = []
            for i in range(0, len(batch), fixed):
                chunk = batch[i:i + fixed]
                n = len(chunk)
                if n < fixed:  # pad the last chunk up to the fixed batch size
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
                chunks.append(chunk)
            outs = [out[:len(batch) - i * fixed] for i, out in enumerate(self._each(chunks))]
        self.ort_seconds += time.perf_counter() - t0
        return self._checked(np.concatenate(outs) if len(outs) != 1 else outs[0])

    @property
    def _splits(self) -> bool:
        """Batches go out as ``calls`` concurrent calls (on the CPU only)."""
        return self.calls > 1 and not self.on_cuda

    def _each(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """The model's raw output for every chunk, in order: ``calls`` at a time on the CPU, else one by one."""
        def one(chunk: np.ndarray) -> np.ndarray:
            return self.session.run([self.output_name], {self.input_name: chunk})[0]

        if len(chunks) == 1 or not self._splits:
            return [one(c) for c in chunks]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.calls, thread_name_prefix="ort-call")
        return list(self._pool.map(one, chunks))

    # ------------------------------------------------------------------ CUDA path
    def run_device(self, ptr: int, n: int, log: bool = False) -> np.ndarray:
        """Run a batch that already lives in GPU memory (model format, float32) through IOBinding.

        The input never visits the host: ``ptr`` is the device pointer of an (n, ...) float32 array laid
        out as ``spec.model_shape(n)``. Only the (n, K) outputs are copied back.
        """
        if not self.on_cuda:
            raise ModelError("run_device needs a session on the CUDA execution provider")
        self.charge(n)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", 0, np.float32, list(self.spec.model_shape(n)), ptr)
        binding.bind_output(self.output_name, "cpu")
        t0 = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.ort_seconds += time.perf_counter() - t0
        raw = binding.copy_outputs_to_cpu()[0]
        if not np.all(np.isfinite(raw)):
            raise ModelError("model returned non-finite outputs (NaN or inf)")
        return self._to_scores(raw, log)

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "input_name": self.input_name,
            "input_shape": [d if isinstance(d, int) else str(d) for d in self.input_shape],
            "output_name": self.output_name,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
        }
