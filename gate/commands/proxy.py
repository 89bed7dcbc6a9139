"""``gate proxy --model M --report OUT/report.json``: serve the model behind the runtime shield.

An Open Inference Protocol (KServe V2) REST server. Each request's images and their copies stamped with
every flagged class's reversed trigger go to the model in one call; S(x) = min KL(f(x) || f(stamped x))
below tau means the input carries the trigger (reject: HTTP 403; flag: served with parameters
backdoor_gate_flagged / backdoor_gate_score; shadow: served, only counted in /metrics).

HTTP statuses of POST /v2/models/NAME/infer: 200 served; 400 malformed request (or JSON nested over 64
levels), unknown input or output, wrong datatype or shape, data that are not numbers, NaN/inf values, values
outside the model's input range (what [0, 1] images encode to under --input-range, --mean and --std); 403
refused by the shield, body {"error": ..., "score": S} (the request is valid but the server declines to
serve it); 404 unknown model or version; 413 body over --max-request-bytes; 415 unsupported
Content-Encoding; 502 the model or upstream failed; 503 queue full (Retry-After: 1); 504 no answer within
--upstream-timeout. Errors are {"error": "..."}. Prometheus metrics at GET /metrics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from gate.commands.common import add_model_args, as_scanned, spec_from_args
from gate.errors import GateError, UsageError
from gate.oracle import Oracle
from gate.result import Triggers
from gate.shield import Shield, load_scan_triggers


def register(sub) -> None:
    p = sub.add_parser("proxy", help="serve a model behind the runtime shield (KServe V2 REST)",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the ONNX model (served in process, or the file the "
                   "--upstream server serves: its input spec is read from it)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--report", help="report.json of a gate scan of this model (its flagged classes)")
    src.add_argument("--no-shield", action="store_true", help="no shield: a plain V2 server of the model "
                     "(an upstream for another proxy, or a baseline)")
    p.add_argument("--triggers", help="triggers.npz of the scan (default: beside the report)")
    thr = p.add_mutually_exclusive_group()
    thr.add_argument("--threshold", type=float, help="tau: refuse inputs with S(x) < tau")
    thr.add_argument("--calibration", help="calibration.json from `gate calibrate` (sets tau)")
    p.add_argument("--mode", choices=["reject", "flag", "shadow"], default="reject",
                   help="reject: HTTP 403; flag: serve and mark the response; shadow: serve, only count "
                        "(default reject)")
    p.add_argument("--upstream", help="URL of a V2 server that serves the model (default: run it in process); "
                   "at start-up its model metadata must match the model file (input name, datatype, shape; "
                   "output name), or the proxy refuses to start")
    p.add_argument("--upstream-model", help="model name on the upstream (default: the served name)")
    p.add_argument("--upstream-timeout", type=float, default=30.0,
                   help="seconds to wait for the model/upstream per batch; then 504 (default 30)")
    p.add_argument("--model-name", help="name the model is served under (default: the file name stem)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="images per model call when batching concurrent requests; 1 turns batching off "
                        "(default 8)")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="microseconds to wait for more requests to batch (default 0: only those already "
                        "queued)")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting at most; then 503 (1024)")
    p.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024,
                   help="request body limit in bytes; then 413 (default 16 MiB)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    p.add_argument("--allow-unverified-report", action="store_true",
                   help="use a report the proxy would refuse (incomplete scan, review or error decision, no model "
                        "sha256), with a loud warning")
    add_model_args(p)
    p.set_defaults(handler=run)


def _check(args: argparse.Namespace) -> None:
    for flag, value, least in (("--max-batch-size", args.max_batch_size, 1), ("--max-queue", args.max_queue, 1),
                               ("--max-request-bytes", args.max_request_bytes, 1),
                               ("--max-queue-delay-us", args.max_queue_delay_us, 0),
                               ("--max-batch", args.max_batch, 1), ("--threads", args.threads, 0)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be a TCP port, got {args.port}")
    if not args.upstream_timeout > 0:
        raise UsageError("--upstream-timeout must be positive")
    if args.no_shield and (args.triggers or args.threshold is not None or args.calibration):
        raise UsageError("--no-shield takes no --triggers, --threshold or --calibration")
    if args.upstream and not args.upstream.startswith(("http://", "https://")):
        raise UsageError(f"--upstream must be an http(s) URL, got {args.upstream!r}")


def build(args: argparse.Namespace):
    """(app, startup message) from the command line; raises GateError / UsageError."""
    from gate.calibrate import Calibration
    from gate.proxy import ProxyConfig, create_app, model_tensors
    from gate.proxy.upstream import EmbeddedModel, RemoteModel

    _check(args)
    oracle = Oracle(args.model, spec_from_args(args), device=args.device, max_batch=args.max_batch,
                    threads=args.threads)
    name = args.model_name or Path(args.model).stem
    h, w, c = oracle.image_shape
    threshold, target_frr, source = args.threshold, None, "--threshold"
    if args.no_shield:
        triggers = Triggers(np.zeros(0, np.int64), np.zeros((0, h, w), np.float32),
                            np.zeros((0, h, w, c), np.float32), np.zeros(0, bool))
        why = "--no-shield: plain V2 server, every request passes"
    else:
        st = load_scan_triggers(args.report, args.triggers, model_sha256=oracle.sha256,
                                allow_unverified=args.allow_unverified_report,
                                warn=lambda text: print(f"gate proxy: {text}", file=sys.stderr, flush=True))
        triggers = st.triggers
        oracle = as_scanned(oracle, st.report.get("input_spec"), spec_from_args(args), args.report)
        why = f"{args.report} flags no class: the shield is off, every request passes through"
        if args.calibration:
            cal = Calibration.load(args.calibration)
            if cal.triggers_sha256 != st.triggers_sha256:
                raise GateError(f"{args.calibration} was calibrated for other triggers (sha256 "
                                f"{cal.triggers_sha256[:12]}..., {st.triggers_path} is {st.triggers_sha256[:12]}...)")
            if cal.model_sha256 != oracle.sha256:
                raise GateError(f"{args.calibration} was calibrated on another model file")
            threshold, target_frr = cal.threshold, cal.target_frr
            source = f"{args.calibration}, target FRR {cal.target_frr:g} on {cal.n} clean images"
        if st.flagged and threshold is None:
            raise UsageError(f"{args.report} flags classes {st.flagged}: state --threshold, or --calibration "
                             f"from `gate calibrate`")
    shield = Shield(triggers, oracle.spec, threshold)
    model_input, model_output = model_tensors(oracle)
    if args.upstream:
        model = RemoteModel(args.upstream, args.upstream_model or name, model_input, model_output.name, shield,
                            timeout=args.upstream_timeout)
        where = f"upstream {args.upstream} (model '{args.upstream_model or name}')"
        warning = model.check_metadata()
        if warning:
            where += f"; warning: {warning}"
    else:
        model = EmbeddedModel(oracle, shield, timeout=args.upstream_timeout)
        where = f"in process ({oracle.providers[0]})"
    config = ProxyConfig(model_name=name, mode=args.mode, max_request_bytes=args.max_request_bytes,
                         max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                         max_queue=args.max_queue, target_frr=target_frr)
    model.warm_up()
    app = create_app(shield, model, model_input, model_output, config)
    url = f"http://{args.host}:{args.port}/v2/models/{name}"
    if shield.active:
        what = (f"shield on: {shield.triggers} reversed trigger(s) of classes {shield.labels}, tau {threshold:.6g} "
                f"({source}), mode {args.mode}")
    else:
        what = why
    batching = (f"batching up to {args.max_batch_size} images, {args.max_queue_delay_us} us delay"
                if args.max_batch_size > 1 else "batching off")
    message = f"gate proxy: serving {args.model} as {url}; model {where}; {what}; {batching}"
    return app, message


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app, message = build(args)
    print(message, file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
        if exc.code:
            raise GateError(f"cannot serve on {args.host}:{args.port} (see above)") from None
    if not server.started:
        raise GateError(f"the proxy did not start on {args.host}:{args.port}")
    return 0
