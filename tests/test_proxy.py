"""The proxy: V2 conformance with the real tritonclient, modes, errors and status codes, micro-batching,
forward mode against a second real server, metrics, and a 1,000-concurrent-request load test.

Servers run ``gate proxy`` in subprocesses on free ports of 127.0.0.1 (or the app in process) and are
always shut down. No request leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.serve import HOST, Server, gate_proxy
from gate.cli import build_parser
from gate.commands.proxy import build
from gate.errors import GateError
from gate.oracle import Oracle
from gate.proxy import ProxyConfig, create_app, model_tensors
from gate.proxy.batcher import MicroBatcher
from gate.proxy.upstream import RemoteModel, UpstreamError, UpstreamTimeout
from gate.shield import Scored, Shield
from tests.helpers import DEMO_MODEL, Demo, InProcess, linear_model, patch_triggers, write_scan

pytestmark = pytest.mark.skipif(not DEMO_MODEL.exists(), reason=f"demo model {DEMO_MODEL} not built")

NAME = "gtsrb_badnets3x3"


# ---------------------------------------------------------------------- servers
def serve(args: list[str], log: Path):
    """``gate proxy ARGS`` in a subprocess on 127.0.0.1 (a free port), ready when /v2/health/ready answers."""
    return gate_proxy(args, log=log, timeout=90)


def scrape(server: Server) -> str:
    """The server's Prometheus exposition."""
    return _HTTP.get(server.url + "/metrics").text


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in a Prometheus text exposition."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted(p for p in (m.group(2) or "{}")[1:-1].split(",") if p))
        if got == want:
            return float(m.group(3))
    raise KeyError(f"{name}{{{want}}} not in metrics")


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo():
    return Demo()


@pytest.fixture(scope="module")
def oracle(demo):
    return Oracle(demo.model, device="cpu")


@pytest.fixture(scope="module")
def scan(demo, tmp_path_factory):
    """report.json + triggers.npz (the true trigger) and a calibration for them."""
    d = tmp_path_factory.mktemp("scan")
    report = demo.write_scan(d)
    np.savez(d / "clean.npz", x=(demo.calib_x * 255).round().astype(np.uint8))
    from gate.cli import main

    assert main(["calibrate", "--model", str(demo.model), "--report", str(report), "--data", str(d / "clean.npz"),
                 "--target-frr", "0.01", "--out", str(d / "calibration.json"), "--device", "cpu"]) == 0
    return {"report": str(report), "calibration": str(d / "calibration.json"), "dir": d}


@pytest.fixture(scope="module")
def clean_ok(demo, oracle, scan):
    """Clean test images the calibrated shield lets through (about 1% of clean images are refused by
    design; a request is refused when any of its images is)."""
    from gate.calibrate import Calibration, shield_scores

    shield = Shield(demo.triggers, oracle.spec, Calibration.load(scan["calibration"]).threshold)
    return demo.clean_x[~shield.rejects(shield_scores(shield, oracle, demo.clean_x))]


def model_batch(images: np.ndarray) -> np.ndarray:
    """float NHWC [0,1] -> the demo model's input (NCHW, [0,1])."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)


@pytest.fixture(scope="module")
def server(demo, scan, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "proxy.log"
    with serve(["--model", str(demo.model), "--report", scan["report"], "--calibration", scan["calibration"],
                "--max-queue", "4096", "--max-request-bytes", str(2 * 1024 * 1024), "--device", "cpu"], log) as s:
        yield s


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.http as th

    client = th.InferenceServerClient(f"{HOST}:{server.port}")
    yield client
    client.close()


def tinput(x: np.ndarray, binary: bool, name="input", datatype="FP32"):
    import tritonclient.http as th

    inp = th.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def toutput(binary: bool):
    import tritonclient.http as th

    return [th.InferRequestedOutput("output", binary_data=binary)]


# ---------------------------------------------------------------------- V2 conformance, real client
def test_health_and_metadata_with_tritonclient(triton, oracle):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(NAME) and not triton.is_model_ready("other")
    meta = triton.get_server_metadata()
    assert meta["name"] == "backdoor-gate-proxy" and "binary_tensor_data" in meta["extensions"]
    model = triton.get_model_metadata(NAME)
    assert model["name"] == NAME and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert model["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, oracle.num_classes]}]
    assert triton.get_model_metadata(NAME, model_version="1")["name"] == NAME
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        triton.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="unknown version '7'"):
        triton.get_model_metadata(NAME, model_version="7")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_clean_images_are_served_unchanged(triton, clean_ok, oracle, binary):
    x = model_batch(clean_ok[:8])
    result = triton.infer(NAME, [tinput(x, binary)], outputs=toutput(binary), request_id="r-1")
    out = result.as_numpy("output")
    want = oracle_raw(oracle, x)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)
    resp = result.get_response()
    assert resp["model_name"] == NAME and resp["id"] == "r-1" and "parameters" not in resp


def oracle_raw(oracle, x):
    from gate.shield import oracle_forward

    return oracle_forward(oracle)(x)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_triggered_images_are_refused_with_403(triton, demo, binary):
    from tritonclient.utils import InferenceServerException

    x = model_batch(demo.triggered_x[:4])
    with pytest.raises(InferenceServerException) as info:
        triton.infer(NAME, [tinput(x, binary)], outputs=toutput(binary))
    assert info.value.status() == "403" and "refused by the backdoor gate" in info.value.message()


def test_demo_sample_through_the_proxy(server, demo):
    """Every odd-indexed sample image, one per request: clean pass, triggered refused."""
    clean = [post_binary(server.url, model_batch(demo.clean_x[i:i + 1])) for i in range(len(demo.clean_x))]
    trig = [post_binary(server.url, model_batch(demo.triggered_x[i:i + 1])) for i in range(len(demo.triggered_x))]
    clean_codes = np.array([r.status_code for r in clean])
    trig_codes = np.array([r.status_code for r in trig])
    assert set(clean_codes) <= {200, 403} and set(trig_codes) <= {200, 403}
    assert np.mean(clean_codes == 200) >= 0.95
    assert np.mean(trig_codes == 403) >= 0.95
    body = trig[int(np.argmax(trig_codes == 403))].json()
    assert set(body) == {"error", "score"} and body["score"] >= 0


def test_request_compression_and_batch_of_many(triton, clean_ok, oracle):
    x = model_batch(clean_ok[:40])
    result = triton.infer(NAME, [tinput(x, True)], outputs=toutput(True), request_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("output"), oracle_raw(oracle, x), rtol=1e-5, atol=1e-7)


def test_bad_requests_through_tritonclient(triton, demo):
    from tritonclient.utils import InferenceServerException

    x = model_batch(demo.clean_x[:2])
    cases = [
        ([tinput(x, True, name="pixels")], NAME, "400", "unknown input 'pixels'"),
        ([tinput(x.astype(np.float64), True, datatype="FP64")], NAME, "400", "datatype 'FP64'"),
        ([tinput(x.transpose(0, 2, 3, 1).copy(), False)], NAME, "400", "does not match the model input"),
        ([tinput(x, True)], "other", "404", "unknown model 'other'"),
    ]
    for inputs, model, status, message in cases:
        with pytest.raises(InferenceServerException) as info:
            triton.infer(model, inputs)
        assert info.value.status() == status and message in info.value.message()


# ---------------------------------------------------------------------- raw HTTP error cases
_HTTP = httpx.Client(timeout=30)  # one client: creating one per request costs tens of milliseconds


def post_binary(url: str, x: np.ndarray, model: str = NAME, **kw) -> httpx.Response:
    from gate.proxy.codec import TensorSpec, encode_infer_request

    body, headers = encode_infer_request(TensorSpec("input", "FP32", (-1, 3, 32, 32)), x, "output")
    return _HTTP.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers, **kw)


def infer_json(url: str, payload, **kw) -> httpx.Response:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return _HTTP.post(f"{url}/v2/models/{NAME}/infer", content=content, **kw)


def valid_json(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def test_error_statuses_and_bodies(server, clean_ok):
    x = model_batch(clean_ok[:1])
    ok = valid_json(x)
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty request body"),
        (b"[1, 2]", 400, "JSON object"),
        ({}, 400, "'inputs'"),
        ({"inputs": [dict(ok["inputs"][0], shape=[1, 3, 32])]}, 400, "does not match the model input"),
        ({"inputs": [dict(ok["inputs"][0], shape=[0, 3, 32, 32], data=[])]}, 400, "at least 1"),
        ({"inputs": [dict(ok["inputs"][0], shape=[2, 3, 32, 32])]}, 400, "holds 3072 values"),
        ({"inputs": [dict(ok["inputs"][0], datatype="FLOAT")]}, 400, "not a V2 datatype"),
        ({"inputs": [dict(ok["inputs"][0], data=["a"] * 3072)]}, 400, "FP32 numbers"),
        ({"inputs": [dict(ok["inputs"][0], data=[float("nan")] * 3072)]}, 400, "NaN"),
        ({"inputs": ok["inputs"] * 2}, 400, "exactly one input"),
        (dict(ok, outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
        (dict(ok, parameters={"binary_data_output": "yes"}), 400, "true or false"),
    ]
    for payload, status, message in cases:
        r = infer_json(server.url, payload)
        assert r.status_code == status, (payload if isinstance(payload, bytes) else str(payload)[:80], r.text)
        assert set(r.json()) == {"error"} and message in r.json()["error"], r.json()

    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 12288}}]}).encode()
    raw = x.tobytes()
    for header, content, message in [("abc", body + raw, "must be an integer"),
                                     (str(len(body) + len(raw) + 1), body + raw, "outside the body"),
                                     (str(len(body)), body + raw[:-4], "carries 12284 binary bytes")]:
        r = infer_json(server.url, content, headers={"Inference-Header-Content-Length": header})
        assert r.status_code == 400 and message in r.json()["error"], r.text

    r = infer_json(server.url, b"x" * (2 * 1024 * 1024 + 1))
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    bomb = gzip.compress(b" " * (3 * 1024 * 1024))
    r = infer_json(server.url, bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "decompressed" in r.json()["error"]
    r = infer_json(server.url, b"{}", headers={"Content-Encoding": "br"})
    assert r.status_code == 415
    r = _HTTP.get(f"{server.url}/v2/models/{NAME}/infer")
    assert r.status_code == 405 and "error" in r.json()
    r = _HTTP.get(f"{server.url}/v2/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = _HTTP.post(f"{server.url}/v2/models/{NAME}/versions/2/infer", content=json.dumps(ok))
    assert r.status_code == 404 and "unknown version" in r.json()["error"]
    # the server is still healthy and serves
    assert infer_json(server.url, ok).status_code == 200
    assert server.proc.poll() is None


def test_metrics_exposition(server, demo):
    post_binary(server.url, model_batch(demo.clean_x[:1]))
    text = scrape(server)
    assert metric(text, "backdoor_gate_proxy_requests_total", outcome="forwarded") >= 1
    assert metric(text, "backdoor_gate_proxy_requests_total", outcome="rejected") >= 0
    assert metric(text, "backdoor_gate_proxy_score_count") >= 1
    for stage in ("queue", "model", "total"):
        assert metric(text, "backdoor_gate_proxy_request_duration_seconds_count", stage=stage) >= 1
    assert metric(text, "backdoor_gate_proxy_queue_depth") >= 0
    assert metric(text, "backdoor_gate_proxy_triggers") == 1
    assert metric(text, "backdoor_gate_proxy_target_false_rejection_ratio") == 0.01
    assert metric(text, "backdoor_gate_proxy_threshold") > 0
    assert 'backdoor_gate_proxy_build_info{' in text and 'mode="reject"' in text
    # every proxy metric the alert rules use exists
    rules = (Path(__file__).resolve().parent.parent / "policies" / "alerts.yml").read_text()
    for name in set(re.findall(r"backdoor_gate_proxy_\w+", rules)):
        assert re.search(rf"^{name}[{{ ]", text, re.M), f"alerts.yml uses {name}, which the proxy does not export"
    # label sets stay bounded: outcome, reason and stage only take their fixed values
    outcomes = set(re.findall(r'backdoor_gate_proxy_requests_total\{outcome="(\w+)"', text))
    assert outcomes == {"forwarded", "rejected", "flagged", "error"}


# ---------------------------------------------------------------------- load: 1,000 concurrent requests
def test_thousand_concurrent_requests_lose_nothing_and_memory_stays_bounded(server, demo):
    from gate.proxy.codec import TensorSpec, encode_infer_request

    spec = TensorSpec("input", "FP32", (-1, 3, 32, 32))
    clean = [encode_infer_request(spec, model_batch(demo.clean_x[i % len(demo.clean_x)][None]), "output")
             for i in range(500)]
    trig = [encode_infer_request(spec, model_batch(demo.triggered_x[i % len(demo.triggered_x)][None]), "output")
            for i in range(500)]
    jobs = [(c, "clean") for c in clean] + [(t, "triggered") for t in trig]
    np.random.default_rng(0).shuffle(jobs)

    async def one(job):
        """One request on its own connection: all 1,000 are open and in flight together."""
        (body, headers), kind = job
        reader, writer = await asyncio.open_connection(HOST, server.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
                     f"{head}Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0
        return kind, status

    async def fire():
        return await asyncio.gather(*(one(j) for j in jobs))

    before = scrape(server)
    for _ in range(3):  # warm up allocator and connection handling
        post_binary(server.url, model_batch(demo.clean_x[:1]))
    rss0 = server.rss_kib()
    t0 = time.perf_counter()
    first = asyncio.run(fire())
    rss1 = server.rss_kib()
    second = asyncio.run(fire())
    rss2 = server.rss_kib()
    seconds = time.perf_counter() - t0
    for results in (first, second):
        assert len(results) == 1000
        codes = {kind: [c for k, c in results if k == kind] for kind in ("clean", "triggered")}
        assert set(codes["clean"]) | set(codes["triggered"]) <= {200, 403}, "a request was lost or failed"
        assert np.mean(np.array(codes["clean"]) == 200) >= 0.95
        assert np.mean(np.array(codes["triggered"]) == 403) >= 0.95
    after = scrape(server)
    served = sum(metric(after, "backdoor_gate_proxy_requests_total", outcome=o)
                 - metric(before, "backdoor_gate_proxy_requests_total", outcome=o)
                 for o in ("forwarded", "rejected", "flagged", "error"))
    assert served == 2003
    assert metric(after, "backdoor_gate_proxy_requests_total", outcome="error") == \
        metric(before, "backdoor_gate_proxy_requests_total", outcome="error")
    # under load the batcher merges requests: fewer model calls than images
    assert metric(after, "backdoor_gate_proxy_batch_images_sum") > \
        metric(after, "backdoor_gate_proxy_batch_images_count")
    assert (rss1 - rss0) < 150 * 1024, f"RSS grew {rss0} -> {rss1} KiB in the first round"
    assert (rss2 - rss1) < 40 * 1024, f"RSS grew {rss1} -> {rss2} KiB in the second round"
    assert seconds < 60
    print(f"\n2x1000 concurrent requests in {seconds:.1f}s; RSS {rss0 // 1024} -> {rss1 // 1024} -> "
          f"{rss2 // 1024} MiB")


# ---------------------------------------------------------------------- forward mode: a second real server
def test_forward_mode_against_a_real_upstream(demo, scan, oracle, clean_ok, tmp_path):
    with serve(["--model", str(demo.model), "--no-shield", "--device", "cpu"], tmp_path / "upstream.log") as up, \
            serve(["--model", str(demo.model), "--report", scan["report"], "--calibration", scan["calibration"],
                   "--upstream", up.url, "--device", "cpu"], tmp_path / "proxy.log") as proxy:
        assert "upstream " + up.url in proxy.output() and "warning" not in proxy.output()  # metadata matched
        assert _HTTP.get(proxy.url + "/v2/health/ready").status_code == 200
        x = model_batch(clean_ok[:6])
        r = post_binary(proxy.url, x)
        assert r.status_code == 200
        from gate.proxy.codec import decode_infer_response

        out = decode_infer_response(r.content, r.headers.get("inference-header-content-length"), "output")
        np.testing.assert_allclose(out, oracle_raw(oracle, x), rtol=1e-5, atol=1e-7)
        r = post_binary(proxy.url, model_batch(demo.triggered_x[:3]))
        assert r.status_code == 403 and r.json()["score"] < 1e-2
        # the upstream saw each request once, as x and its stamped copy in one call
        up_metrics = scrape(up)
        assert metric(up_metrics, "backdoor_gate_proxy_requests_total", outcome="forwarded") == 2
        assert metric(up_metrics, "backdoor_gate_proxy_batch_images_sum") == 2 * (6 + 3)
        assert metric(up_metrics, "backdoor_gate_proxy_triggers") == 0
    # upstream gone: the proxy answers 502 and says it is not ready
    args = build_parser().parse_args(["proxy", "--model", str(demo.model), "--report", scan["report"],
                                      "--calibration", scan["calibration"], "--upstream", up.url])
    app, message = build(args)  # an upstream not up yet is no reason to refuse to start
    assert "not reachable at start-up" in message and "metadata is unchecked" in message

    with InProcess(app) as client:
        r = client.post(f"/v2/models/{NAME}/infer", json=valid_json(model_batch(demo.clean_x[:1])))
        assert r.status_code == 502 and "unreachable" in r.json()["error"]
        assert client.get("/v2/health/ready").status_code == 503


def test_upstream_that_never_answers_gives_504_and_upstream_errors_give_502(demo, scan, tmp_path, monkeypatch):
    silent = socket.socket()
    silent.bind((HOST, 0))
    silent.listen(16)  # accepts connections (kernel backlog) and never answers
    url = f"http://{HOST}:{silent.getsockname()[1]}"
    try:
        args = build_parser().parse_args(["proxy", "--model", str(demo.model), "--report", scan["report"],
                                          "--calibration", scan["calibration"], "--upstream", url,
                                          "--upstream-timeout", "0.5"])
        app, _ = build(args)

        with InProcess(app) as client:
            t0 = time.perf_counter()
            r = client.post(f"/v2/models/{NAME}/infer", json=valid_json(model_batch(demo.clean_x[:1])))
            assert r.status_code == 504 and "did not answer within 0.5s" in r.json()["error"]
            assert time.perf_counter() - t0 < 5
            text = client.get("/metrics").text
            assert metric(text, "backdoor_gate_proxy_errors_total", reason="upstream_timeout") == 1
    finally:
        silent.close()
    # an upstream that answers with an error (here: it serves no model of that name). The start-up
    # metadata check refuses it; bypassed, the same error at request time is a 502.
    with serve(["--model", str(demo.model), "--no-shield", "--device", "cpu"], tmp_path / "up.log") as up:
        args = build_parser().parse_args(["proxy", "--model", str(demo.model), "--report", scan["report"],
                                          "--calibration", scan["calibration"], "--upstream", up.url,
                                          "--upstream-model", "not-there"])
        with pytest.raises(GateError, match=r"model 'not-there': metadata request answered 404"):
            build(args)
        monkeypatch.setattr(RemoteModel, "check_metadata", lambda self: None)
        app, _ = build(args)

        with InProcess(app) as client:
            r = client.post(f"/v2/models/{NAME}/infer", json=valid_json(model_batch(demo.clean_x[:1])))
            assert r.status_code == 502 and "answered 404" in r.json()["error"]


def test_upstream_serving_another_model_is_refused_at_start_up(demo, scan, tmp_path):
    other = tmp_path / "other.onnx"
    linear_model(other, size=16, classes=43, softmax=True)  # same classes, 16x16 images
    with serve(["--model", str(other), "--model-name", NAME, "--no-shield", "--device", "cpu"],
               tmp_path / "up.log") as up:
        args = build_parser().parse_args(["proxy", "--model", str(demo.model), "--report", scan["report"],
                                          "--calibration", scan["calibration"], "--upstream", up.url])
        with pytest.raises(GateError, match=rf"upstream {up.url} model '{NAME}'.* the model file's is FP32"):
            build(args)


# ---------------------------------------------------------------------- modes, in process
def in_process(demo, scan, *extra: str):

    args = build_parser().parse_args(["proxy", "--model", str(demo.model), "--report", scan["report"],
                                      "--calibration", scan["calibration"], "--device", "cpu", *extra])
    app, message = build(args)
    return InProcess(app), message


@pytest.mark.parametrize("mode", ["flag", "shadow"])
def test_flag_and_shadow_modes_serve_everything(demo, scan, clean_ok, mode):
    client, message = in_process(demo, scan, "--mode", mode)
    assert f"mode {mode}" in message
    with client:
        clean = client.post(f"/v2/models/{NAME}/infer", json=valid_json(model_batch(clean_ok[:1])))
        trig = client.post(f"/v2/models/{NAME}/infer", json=valid_json(model_batch(demo.triggered_x[:1])))
        assert clean.status_code == 200 and trig.status_code == 200
        if mode == "flag":
            assert clean.json()["parameters"]["backdoor_gate_flagged"] is False
            assert trig.json()["parameters"]["backdoor_gate_flagged"] is True
            assert trig.json()["parameters"]["backdoor_gate_score"] < clean.json()["parameters"]["backdoor_gate_score"]
        else:
            assert "parameters" not in clean.json() and "parameters" not in trig.json()
        text = client.get("/metrics").text
        assert metric(text, "backdoor_gate_proxy_requests_total", outcome="flagged") == 1
        assert metric(text, "backdoor_gate_proxy_requests_total", outcome="forwarded") == 1
        assert metric(text, "backdoor_gate_proxy_requests_total", outcome="rejected") == 0


def test_report_without_flagged_classes_passes_everything(demo, tmp_path):
    report = write_scan(tmp_path / "scan", demo.model, demo.triggers, flagged=[])
    args = build_parser().parse_args(["proxy", "--model", str(demo.model), "--report", str(report)])
    app, message = build(args)
    assert "flags no class" in message and "passes through" in message
    with InProcess(app) as client:
        r = client.post(f"/v2/models/{NAME}/infer", json=valid_json(model_batch(demo.triggered_x[:2])))
        assert r.status_code == 200


def test_command_line_refusals(demo, scan, tmp_path, capsys):
    from gate.cli import main

    base = ["proxy", "--model", str(demo.model), "--report", scan["report"]]
    assert main(base) == 4  # flagged classes but no tau
    assert "--threshold, or --calibration" in capsys.readouterr().err
    assert main([*base, "--threshold", "0.1", "--max-batch-size", "0"]) == 4
    assert main([*base, "--threshold", "0.1", "--upstream", "ftp://x"]) == 4
    # a calibration made for other triggers is refused
    other = dict(demo.trigger, row=0, col=0)
    other_report = tmp_path / "other"
    write_scan(other_report, demo.model, patch_triggers(other))
    assert main(["proxy", "--model", str(demo.model), "--report", str(other_report / "report.json"),
                 "--calibration", scan["calibration"]]) == 2
    assert "calibrated for other triggers" in capsys.readouterr().err
    # a report of another model is refused
    lin = tmp_path / "lin.onnx"
    linear_model(lin, size=32, classes=43, softmax=True)
    assert main(["proxy", "--model", str(lin), "--report", scan["report"], "--threshold", "1"]) == 2
    assert "written for another model" in capsys.readouterr().err
    # port already taken: a clear error, exit 2
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen(1)
        rc = main([*base, "--threshold", "0.1", "--host", HOST, "--port", str(s.getsockname()[1])])
    assert rc == 2


# ---------------------------------------------------------------------- batching, queue limit, timeouts
def test_micro_batching_merges_concurrent_requests_and_routes_answers(demo, scan, oracle, clean_ok):
    client, _ = in_process(demo, scan, "--max-batch-size", "16", "--max-queue-delay-us", "20000")
    app = client.app
    x = model_batch(clean_ok[:24])
    want = oracle_raw(oracle, x)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as c:
            async def one(i):
                n = 1 + i % 3  # requests of 1, 2 and 3 images
                r = await c.post(f"/v2/models/{NAME}/infer", json=dict(valid_json(x[i:i + n]), id=str(i)))
                return i, n, r
            return await asyncio.gather(*(one(i) for i in range(20)))

    async def with_lifespan():
        async with app.router.lifespan_context(app):
            return await go()

    results = asyncio.run(with_lifespan())
    for i, n, r in results:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == str(i) and body["outputs"][0]["shape"] == [n, oracle.num_classes]
        got = np.array(body["outputs"][0]["data"], np.float32).reshape(n, -1)
        np.testing.assert_allclose(got, want[i:i + n], rtol=1e-5, atol=1e-7)
    text = asyncio.run(_metrics(app))
    calls = metric(text, "backdoor_gate_proxy_batch_images_count")
    images = metric(text, "backdoor_gate_proxy_batch_images_sum")
    assert images == sum(n for _, n, _ in results) and calls < 20  # merged: fewer model calls than requests


async def _metrics(app) -> str:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as c:
        return (await c.get("/metrics")).text


class _StuckModel:
    """A model that holds every batch until released (or fails / times out on demand)."""

    kind = "test"

    def __init__(self, fail: Exception | None = None) -> None:
        self.release = asyncio.Event()
        self.fail = fail
        self.batches: list[int] = []

    async def run(self, x):
        self.batches.append(len(x))
        if self.fail is not None:
            raise self.fail
        await self.release.wait()
        return Scored(np.zeros((len(x), 3), np.float32), np.full(len(x), np.inf))

    async def ready(self):
        return True

    async def close(self):
        pass


def _tiny_app(tmp_path, model, **config):
    path = tmp_path / "tiny.onnx"
    linear_model(path, size=2, classes=3, softmax=True)
    oracle = Oracle(path, device="cpu")
    empty = Shield(patch_free(oracle), oracle.spec)
    inp, out = model_tensors(oracle)
    return create_app(empty, model, inp, out, ProxyConfig(model_name="tiny", **config))


def patch_free(oracle):
    from gate.result import Triggers

    h, w, c = oracle.image_shape
    return Triggers(np.zeros(0, np.int64), np.zeros((0, h, w), np.float32), np.zeros((0, h, w, c), np.float32),
                    np.zeros(0, bool))


TINY = {"inputs": [{"name": "input", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": [0.5] * 12}]}


def test_full_queue_answers_503(tmp_path):
    model = _StuckModel()
    app = _tiny_app(tmp_path, model, max_queue=2, max_batch_size=1)

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as c:
                tasks = [asyncio.create_task(c.post("/v2/models/tiny/infer", json=TINY))]
                while not model.batches:  # the first request is in the model
                    await asyncio.sleep(0.005)
                tasks += [asyncio.create_task(c.post("/v2/models/tiny/infer", json=TINY)) for _ in range(5)]
                while app.state.batcher.depth < 2 or sum(t.done() for t in tasks) < 3:
                    await asyncio.sleep(0.005)
                late = await c.post("/v2/models/tiny/infer", json=TINY)
                depth = (await c.get("/metrics")).text
                model.release.set()
                return late, await asyncio.gather(*tasks), depth

    late, results, text = asyncio.run(go())
    assert late.status_code == 503 and "queue full" in late.json()["error"] and late.headers["retry-after"] == "1"
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 200, 503, 503, 503]  # one in the model, two waiting, the rest turned away
    assert metric(text, "backdoor_gate_proxy_queue_depth") == 2
    assert metric(text, "backdoor_gate_proxy_errors_total", reason="queue_full") == 4


@pytest.mark.parametrize("fail, status, reason", [
    (UpstreamTimeout("the model did not answer within 1s"), 504, "upstream_timeout"),
    (UpstreamError("the model failed: boom"), 502, "upstream_error"),
    (ValueError("a bug"), 500, "internal"),
])
def test_model_failures_map_to_statuses(tmp_path, fail, status, reason):
    app = _tiny_app(tmp_path, _StuckModel(fail=fail))

    with InProcess(app) as client:
        r = client.post("/v2/models/tiny/infer", json=TINY)
        assert r.status_code == status and "error" in r.json()
        assert metric(client.get("/metrics").text, "backdoor_gate_proxy_errors_total", reason=reason) == 1
        assert client.get("/v2/health/live").status_code == 200


def test_embedded_model_timeout_gives_504(tmp_path):
    from gate.proxy.upstream import EmbeddedModel

    path = tmp_path / "tiny.onnx"
    linear_model(path, size=2, classes=3, softmax=True)
    oracle = Oracle(path, device="cpu")
    shield = Shield(patch_free(oracle), oracle.spec)
    gate_model = EmbeddedModel(oracle, shield, timeout=0.2)
    block = threading.Event()
    original = shield.run
    shield.run = lambda x, f: (block.wait(5), original(x, f))[1]
    inp, out = model_tensors(oracle)
    app = create_app(shield, gate_model, inp, out, ProxyConfig(model_name="tiny"))

    with InProcess(app) as client:
        r = client.post("/v2/models/tiny/infer", json=TINY)
        assert r.status_code == 504 and "0.2s" in r.json()["error"]
        block.set()
        assert client.post("/v2/models/tiny/infer", json=TINY).status_code == 200

    def broken(x, f):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : something inside the session")

    shield.run = broken
    app = create_app(shield, EmbeddedModel(oracle, shield), inp, out, ProxyConfig(model_name="tiny"))
    with InProcess(app) as client:
        r = client.post("/v2/models/tiny/infer", json=TINY)
        assert r.status_code == 502 and "the model failed: RuntimeError" in r.json()["error"]


def test_batcher_respects_sizes_order_and_survives_failures():
    seen = []

    async def run(x):
        seen.append(x[:, 0].tolist())
        if -1 in x[:, 0]:
            raise RuntimeError("bad batch")
        return Scored(x * 10, x[:, 0].astype(np.float64))

    async def go():
        b = MicroBatcher(run, max_batch_size=4, max_queue_delay_us=50_000, max_queue=100)
        b.start()
        sizes = [1, 2, 1, 3, 6, 1]
        xs, start = [], 0
        for n in sizes:
            xs.append(np.arange(start, start + n, dtype=np.float32)[:, None])
            start += n
        answers = await asyncio.gather(*(b.submit(x) for x in xs))
        bad = await asyncio.gather(b.submit(np.array([[-1.0]], np.float32)), return_exceptions=True)
        after = await b.submit(np.array([[5.0]], np.float32))
        await b.stop()
        return xs, answers, bad, after

    xs, answers, bad, after = asyncio.run(go())
    for x, a in zip(xs, answers, strict=True):
        np.testing.assert_array_equal(a.raw, x * 10)  # every request gets its own rows back
        np.testing.assert_array_equal(a.scores, x[:, 0])
    assert all(len(batch) <= 4 for batch in seen[:-2] if len(batch) != 6)  # 6 > 4 runs alone, never split
    assert [0.0] in [b[:1] for b in seen] and sum(len(b) for b in seen[:-2]) == 14
    assert isinstance(bad[0], RuntimeError) and after.scores[0] == 5.0
