"""The remote oracle (``gate scan/run --remote URL --model-name NAME``) against real server processes.

``gate proxy --no-shield`` serving the demo model is the real V2 server: a remote scan gives the local scan's
report (same verdict, bit-identical per-class L1, same queries) and never sends an image beyond the budget.
A tiny V2 server in this process (``FakeV2``, a thread of the standard library's HTTP server) stands in
where a real one cannot be made to misbehave: a transient 503, a dropped connection, slow answers (to see
requests in flight at once), a rate limit, an endpoint that answers labels only. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from bench.serve import HOST, free_port, gate_proxy
from gate.cli import main
from gate.decision import Decision
from gate.errors import ModelError, QueryBudgetExceeded, UsageError
from gate.oracle import softmax
from gate.remote_oracle import RateLimiter, RemoteOracle
from gate.report.attestation import statement
from tests.helpers import DEMO, DEMO_MODEL, ROOT

pytestmark = pytest.mark.skipif(not DEMO_MODEL.exists(), reason=f"demo model {DEMO_MODEL} not built")

SAMPLE = DEMO / "gtsrb_sample.npz"
# cheap search settings (as tests/test_run_cli.py): 43 classes x 15 steps, about 27k queries a scan
FAST = ["--k", "6", "--batch-size", "4", "--max-steps", "15", "--max-images", "100", "--quiet"]


def gate(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def report(out) -> dict:
    return json.loads((out / "report.json").read_text())


# ---------------------------------------------------------------------- the real server: gate proxy
@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    log = tmp_path_factory.mktemp("remote") / "proxy.log"
    with gate_proxy(["--model", DEMO_MODEL, "--no-shield", "--model-name", "demo", "--device", "cpu"], log=log,
                    timeout=90) as server:
        yield server


def images_served(server) -> int:
    """Images the proxy's model has run so far (its batch-size histogram's sum)."""
    text = httpx.get(server.url + "/metrics", trust_env=False).text
    m = re.search(r"^backdoor_gate_proxy_batch_images_sum (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


def test_remote_scan_gives_the_local_report(proxy, tmp_path, capsys):
    """Same seed, same settings: the verdict, every class's L1 (bit for bit: the model's float32 outputs
    travel as binary tensor data, and ONNX Runtime's per-image results do not depend on the batch they came
    in) and the query count are those of the scan of the file."""
    local, remote = tmp_path / "local", tmp_path / "remote"
    # the file's scan would check the input convention first (a served model is scanned as served): stated here
    code_l, out_l, _ = gate(capsys, "scan", DEMO_MODEL, "--data", SAMPLE, "--out", local, "--device", "cpu",
                            "--input-range", "1", *FAST)
    before = images_served(proxy)
    code_r, out_r, _ = gate(capsys, "scan", "--remote", proxy.url, "--model-name", "demo", "--data", SAMPLE,
                            "--out", remote, *FAST)
    a, b = report(local), report(remote)
    assert code_r == code_l == b["decision"]["exit_code"]
    assert b["decision"]["outcome"] == a["decision"]["outcome"] and b["flagged"] == a["flagged"]
    assert b["decision"]["reasons"] == a["decision"]["reasons"]
    assert [c["l1"] for c in b["classes"]] == [c["l1"] for c in a["classes"]]
    assert [c["status"] for c in b["classes"]] == [c["status"] for c in a["classes"]]
    assert b["queries"] == a["queries"]
    assert images_served(proxy) - before == b["queries"]["total"] + 8  # + the probs/logits probe
    model = b["model"]
    assert model["path"] == f"{proxy.url}/v2/models/demo" and model["endpoint"] == proxy.url
    assert model["model_name"] == "demo" and "sha256" not in model and len(model["endpoint_sha256"]) == 64
    assert model["metadata"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert model["server"]["name"] == "backdoor-gate-proxy" and model["num_classes"] == 43
    assert model["transport"]["retries"] == 0 and model["transport"]["images_sent"] == b["queries"]["total"] + 8
    assert b["input_spec"] == a["input_spec"]
    assert out_r.count("\n") == 1 and f"-> {remote / 'report.json'}" in out_r


def test_remote_run_never_sends_an_image_beyond_the_budget(proxy, tmp_path, capsys):
    """gate run --max-queries N: the server runs at most N images, the probe included; the attestation's
    subject is the endpoint."""
    budget = 3000
    before = images_served(proxy)
    code, _, _ = gate(capsys, "run", "--remote", proxy.url, "--model-name", "demo", "--data", SAMPLE, "--out",
                      tmp_path, "--policy", "policies/default.yaml", "--max-queries", budget, "--examples", "0", *FAST)
    sent = images_served(proxy) - before
    doc = report(tmp_path)
    assert code == 3 and doc["complete"] is False and "query budget" in doc["stop_reason"]
    assert sent == doc["queries"]["total"] + 8 <= budget
    assert sent > budget // 2  # it did scan (it stops when the next round and the held-out pass would not fit)
    subject = json.loads((tmp_path / "attestation.json").read_text())["subject"]
    assert subject == [{"name": "demo", "uri": f"{proxy.url}/v2/models/demo",
                        "digest": {"sha256": doc["model"]["endpoint_sha256"]}}]


def test_the_budget_includes_the_probe(proxy, tmp_path, capsys):
    """100 queries: the probe's 8 leave 92, too few to predict the 100 clean images: nothing more is sent."""
    before = images_served(proxy)
    code, out, _ = gate(capsys, "scan", "--remote", proxy.url, "--model-name", "demo", "--data", SAMPLE, "--out",
                        tmp_path, "--max-queries", 100, *FAST)
    assert code == 2 and "query budget too small: predicting the clean images needs 100 queries, 92 left" in out
    assert images_served(proxy) - before == 8


def test_the_oracle_budget_is_counted_in_images_before_anything_is_sent(proxy):
    oracle = RemoteOracle(proxy.url, "demo", max_queries=50, request_images=16)
    assert oracle.queries == 8  # the probe
    before = images_served(proxy)
    x = np.random.default_rng(0).random((42, 32, 32, 3), dtype=np.float32)
    assert oracle.probs(x).shape == (42, 43) and oracle.remaining == 0
    with pytest.raises(QueryBudgetExceeded, match="50 of 50 images used, 1 more needed"):
        oracle.probs(x[:1])
    assert images_served(proxy) - before == 42 and oracle.stats["requests"] == 1 + 3  # probe + 42 in 16s
    oracle.close()


# ---------------------------------------------------------------------- a tiny V2 server of our own
W = np.random.default_rng(5).normal(size=(12, 3)).astype(np.float32)  # a linear 3-class model on 2x2x3 images


class FakeV2:
    """A V2 REST server on 127.0.0.1 in a background thread: metadata of a [-1, 3, 2, 2] FP32 model and
    /infer answering x @ W (JSON outputs) to binary-data requests. ``fail``: answers before the real ones
    ("503", "close": drop the connection); ``outputs`` / ``answer``: what the metadata says and the
    inference answers (to play a labels-only server); ``delay``: seconds each inference takes from the
    ``delay_from``-th one on (0: the first)."""

    def __init__(self, *, fail: list[str] | None = None, outputs: list | None = None, answer=None,
                 delay: float = 0.0, delay_from: int = 0) -> None:
        self.fail, self.delay, self.delay_from = list(fail or []), delay, delay_from
        self.posts = 0
        self.outputs = outputs or [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
        self.answer = answer
        self.images = 0  # images answered
        self.requests: list[dict] = []  # each inference request's JSON header
        self.in_flight = self.most_in_flight = 0
        self.posted = threading.Event()  # an inference request arrived
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send(self, status: int, doc: dict) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v2":
                    self.send(200, {"name": "fake-v2", "version": "0", "extensions": ["binary_tensor_data"]})
                elif self.path == "/v2/models/m":
                    self.send(200, {"name": "m", "versions": ["1"], "platform": "fake",
                                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 2, 2]}],
                                    "outputs": fake.outputs})
                else:
                    self.send(404, {"error": f"no {self.path}"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with fake.lock:
                    failure = fake.fail.pop(0) if fake.fail else None
                    delay = fake.delay if fake.posts >= fake.delay_from else 0.0
                    fake.posts += 1
                    if delay:
                        fake.posted.set()
                if failure == "close":
                    self.close_connection = True
                    return
                if failure == "503":
                    return self.send(503, {"error": "server busy; retry later"})
                n = int(self.headers["Inference-Header-Content-Length"])
                head = json.loads(body[:n])
                x = np.frombuffer(body[n:], np.float32).reshape(head["inputs"][0]["shape"])
                with fake.lock:
                    fake.requests.append(head)
                    fake.in_flight += 1
                    fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)
                time.sleep(delay)
                out = fake.answer(x) if fake.answer else {"name": "logits", "datatype": "FP32",
                                                          "shape": [len(x), 3], "data": (logits(x)).ravel().tolist()}
                with fake.lock:
                    fake.in_flight -= 1
                    fake.images += len(x)
                self.send(200, {"model_name": "m", "outputs": [out]})

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads, self.server.block_on_close = True, False  # a hanging answer holds nothing up
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeV2:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def logits(x: np.ndarray) -> np.ndarray:
    """The fake model: model-format (NCHW) images -> x @ W."""
    return x.reshape(len(x), -1) @ W


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 2, 2, 3), dtype=np.float32)


def expected(x: np.ndarray) -> np.ndarray:
    return softmax(logits(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).astype(np.float32))


@pytest.mark.parametrize("failure", ["503", "close"])
def test_a_transient_failure_is_retried_and_counted_once(failure):
    with FakeV2(fail=[failure, failure]) as server:
        oracle = RemoteOracle(server.url, "m", retries=3, backoff=0.01, concurrency=1)  # the probe hits both
        assert oracle.spec.output_kind == "logits" and oracle.num_classes == 3
        x = images(20)
        np.testing.assert_allclose(oracle.probs(x), expected(x), rtol=1e-5, atol=1e-6)
        assert oracle.queries == 8 + 20 and server.images == 28
        assert oracle.stats["retries"] == 2 and oracle.stats["images_sent"] == 3 * 8 + 20
        assert all(r["inputs"][0]["parameters"]["binary_data_size"] == 4 * 12 * len(x) for r in server.requests[1:])


def test_a_server_that_stays_down_is_a_one_line_error_after_the_retries():
    with FakeV2() as server:
        oracle = RemoteOracle(server.url, "m", retries=2, backoff=0.01)
        server.fail = ["503"] * 3
        with pytest.raises(ModelError) as err:
            oracle.probs(images(4))
        message = str(err.value)
        assert "HTTP 503: server busy; retry later (gave up after 3 tries)" in message and "\n" not in message
        assert server.fail == []


def test_requests_are_split_and_sent_in_parallel_and_come_back_in_order():
    with FakeV2(delay=0.05) as server:
        oracle = RemoteOracle(server.url, "m", request_images=5, concurrency=4)
        x = images(40, seed=1)
        np.testing.assert_allclose(oracle.probs(x), expected(x), rtol=1e-5, atol=1e-6)
        assert [r["inputs"][0]["shape"][0] for r in server.requests[2:]] == [5] * 8
        assert server.most_in_flight == 4
        oracle.close()


def test_max_qps_caps_the_images_sent_per_second():
    with FakeV2() as server:
        oracle = RemoteOracle(server.url, "m", max_qps=100, concurrency=4)  # probe: 8 images booked 0.08 s
        assert oracle.request_images == 100
        oracle.request_images = 10
        t0 = time.perf_counter()
        oracle.probs(images(50))  # 5 requests of 10 images: booked at 0.08, 0.18, ..., 0.48 s after the probe
        assert time.perf_counter() - t0 >= 0.38
        oracle.close()


def test_rate_limiter_books_time_per_image():
    t = [10.0]
    slept = []

    def sleep(s):
        slept.append(round(s, 9))
        t[0] += s

    limiter = RateLimiter(50, clock=lambda: t[0], sleep=sleep)
    for n in (25, 25, 50, 10):
        limiter.acquire(n)
    assert slept == [0.5, 0.5, 1.0] and t[0] == pytest.approx(12.0)
    t[0] += 5  # idle time is not saved up into a burst
    limiter.acquire(50)
    limiter.acquire(1)
    assert slept[-1] == pytest.approx(1.0)


LABELS_ONLY = [
    [{"name": "label", "datatype": "INT64", "shape": [-1, 1]}],
    [{"name": "top1", "datatype": "FP32", "shape": [-1, 1]}],
    [{"name": "classification", "datatype": "BYTES", "shape": [-1, 3]}],
]


@pytest.mark.parametrize("outputs", LABELS_ONLY, ids=["int64-label", "fp32-top1", "bytes-classification"])
def test_a_labels_or_top_k_server_is_refused_with_one_line_and_exit_2(outputs, tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=(images(30) * 255).astype(np.uint8))
    with FakeV2(outputs=outputs) as server:
        code, out, _ = gate(capsys, "scan", "--remote", server.url, "--model-name", "m", "--data", tmp_path / "d.npz",
                            "--out", tmp_path / "out", *FAST)
        assert server.images == 0  # refused from the metadata, before any query
    assert code == 2 and out.count("\n") == 1 and out.startswith("ERROR: ")
    assert "gives no score for every class" in out and "labels or top-k cannot be scanned" in out
    assert report(tmp_path / "out")["decision"]["outcome"] == "error"


def test_a_server_that_answers_labels_despite_its_metadata_is_refused():
    def label(x):
        return {"name": "logits", "datatype": "INT64", "shape": [len(x), 1], "data": [0] * len(x)}

    with FakeV2(answer=label) as server, pytest.raises(ModelError, match="not a score for each of 3 classes"):
        RemoteOracle(server.url, "m")


def test_sigterm_ends_a_scan_waiting_on_a_hung_server_at_once(tmp_path):
    """The requests run in daemon worker threads and the scan waits in short slices: SIGTERM is handled within
    seconds although the server never answers (and the request's timeout is a minute). The probe is answered;
    the clean images' predictions (30 images in 3 requests, in parallel) hang."""
    np.savez(tmp_path / "d.npz", x=(images(30) * 255).astype(np.uint8))
    with FakeV2(delay=120, delay_from=1) as server:
        proc = subprocess.Popen([sys.executable, "-m", "gate", "scan", "--remote", server.url, "--model-name", "m",
                                 "--remote-batch", "10", "--data", str(tmp_path / "d.npz"), "--out",
                                 str(tmp_path / "out"), *FAST],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert server.posted.wait(60), "the scan never queried the server"
            time.sleep(0.5)
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
            took = time.perf_counter() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 2 and "interrupted (SIGTERM)" in out and took < 5
    assert report(tmp_path / "out")["decision"]["outcome"] == "error"


def test_an_unreachable_endpoint_is_one_line_and_exit_2(tmp_path, capsys):
    url = f"http://{HOST}:{free_port()}"
    np.savez(tmp_path / "d.npz", x=(images(30) * 255).astype(np.uint8))
    t0 = time.perf_counter()
    code, out, err = gate(capsys, "scan", "--remote", url, "--model-name", "m", "--data", tmp_path / "d.npz",
                          "--out", tmp_path / "out", *FAST)
    assert time.perf_counter() - t0 < 10  # a refused connection at start-up is not retried
    assert code == 2 and out.count("\n") == 1
    assert out.startswith(f"ERROR: scan failed: GET {url}/v2: cannot reach the model server: ConnectionRefusedError")
    doc = report(tmp_path / "out")
    assert doc["decision"]["outcome"] == "error" and doc["model"]["path"] == f"{url}/v2/models/m"
    assert (tmp_path / "out" / "exit_code").read_text() == "2\n"


def test_an_unknown_model_names_what_the_server_said(tmp_path):
    refused = r"GET http://\S+/v2/models/nope: the server answered HTTP 404: no /v2/models/nope$"
    with FakeV2() as server, pytest.raises(ModelError, match=refused):
        RemoteOracle(server.url, "nope")


@pytest.mark.parametrize("args, message", [
    (["MODEL", "--remote", "http://127.0.0.1:1"], "not both"),
    (["--remote", "http://127.0.0.1:1"], "--remote needs --model-name"),
    ([], "no model: give an ONNX file, or --remote URL --model-name NAME"),
    (["--remote", "ftp://127.0.0.1:1", "--model-name", "m"], "--remote must be an http(s) URL"),
    (["MODEL", "--max-qps", "10"], "--max-qps only with --remote"),
])
def test_model_source_usage_errors_exit_4(args, message, tmp_path, capsys):
    args = [str(DEMO_MODEL) if a == "MODEL" else a for a in args]
    code, _, err = gate(capsys, "scan", *args, "--data", SAMPLE, "--out", tmp_path / "out", *FAST)
    assert code == 4 and message in err


def test_gate_run_without_a_model_is_a_usage_error(tmp_path, capsys):
    code, _, err = gate(capsys, "run", "--policy", "policies/default.yaml", "--out", tmp_path / "out")
    assert code == 4 and "no model: give an ONNX file, or --remote URL --model-name NAME" in err
    assert not (tmp_path / "out").exists()  # refused before the folder is claimed


def test_usage_errors_of_the_oracle():
    with pytest.raises(UsageError, match="--max-qps must be positive"):
        RemoteOracle("http://127.0.0.1:1", "m", max_qps=0)
    with pytest.raises(UsageError, match="concurrency must be at least 1"):
        RemoteOracle("http://127.0.0.1:1", "m", concurrency=0)


def test_attestation_subject_of_a_remote_model_that_could_not_be_opened():
    from gate.remote_oracle import endpoint_facts

    now = datetime.now(timezone.utc)
    doc = statement(Decision.error("unreachable", "error"), endpoint_facts("http://h:1/v2/models/m/versions/2"),
                    None, started=now, finished=now)
    assert doc["subject"] == [{"name": "m", "uri": "http://h:1/v2/models/m/versions/2", "digest": {}}]
