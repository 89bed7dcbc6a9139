"""The CI contract (OUT/exit_code, OUT/outcome), the in-toto attestation, its DSSE signature and ``gate verify``,
on a tiny hand-built model (each scan about a second) with keys made in the test.

The signature is checked here with ``cryptography`` directly, over a pre-authentication encoding built in the
test from the DSSE spec, not by the gate's own verifier.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gate.cli import main
from tests.helpers import ROOT, linear_model

FAST = ["--k", "6", "--batch-size", "4", "--max-steps", "15", "--max-images", "100", "--quiet"]
# the data's labels are random: the clean-accuracy rule is off
NO_FLAGS = {"outliers": {"anomaly_threshold": 1.0e6, "median_ratio": 0.0},
            "rules": {"small_trigger": None, "weak_search": None, "min_clean_accuracy": None}}
# every class's reversed trigger counts as small and effective: BG003 rejects
REJECT = {"rules": {"small_trigger": {"min_asr": 0.0, "max_mask_fraction": 1.0}, "weak_search": None,
                    "min_clean_accuracy": None}}
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("attest")
    linear_model(d / "tiny.onnx", size=8, classes=5, seed=3)
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=(rng.random((120, 8, 8, 3)) * 255).astype(np.uint8), y=rng.integers(0, 5, 120))
    (d / "accept.yaml").write_text(yaml.safe_dump(NO_FLAGS))
    (d / "reject.yaml").write_text(yaml.safe_dump(REJECT))
    key = Ed25519PrivateKey.generate()
    (d / "sign.pem").write_bytes(_pem_private(key))
    (d / "sign.pub.pem").write_bytes(_pem_public(key))
    (d / "other.pub.pem").write_bytes(_pem_public(Ed25519PrivateKey.generate()))
    (d / "ec.pem").write_bytes(_pem_private(ec.generate_private_key(ec.SECP256R1())))
    return d


def gate(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run(capsys, assets: Path, out: Path, policy: str = "accept.yaml", *extra) -> tuple[int, str]:
    code, stdout, _ = gate(capsys, "run", assets / "tiny.onnx", "--policy", assets / policy, "--out", out,
                           "--data", assets / "data.npz", *FAST, *extra)
    return code, stdout


def exit_files(out: Path) -> tuple[str | None, str | None]:
    """(exit_code, outcome) files' text, None for a missing one."""
    return tuple((out / n).read_text() if (out / n).exists() else None for n in ("exit_code", "outcome"))


def read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


@pytest.fixture(scope="module")
def signed(assets, tmp_path_factory):
    """An accepted, signed run's output folder (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("signed") / "out"
    code = main([str(a) for a in ("run", assets / "tiny.onnx", "--policy", assets / "accept.yaml", "--out", out,
                                  "--data", assets / "data.npz", *FAST, "--sign-key", assets / "sign.pem")])
    assert code == 0
    return out


def copy(signed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(signed, tmp_path / "out"))


# --------------------------------------------------------------------------- DSSE
def test_pae_is_the_dsse_spec_encoding():
    from gate.dsse import pae

    vector = b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"  # the spec's test vector
    assert pae("http://example.com/HelloWorld", b"hello world") == vector
    assert pae("é", b"") == b"DSSEv1 2 \xc3\xa9 0 "  # lengths count bytes, not characters


# --------------------------------------------------------------------------- exit_code and outcome
def test_accept_writes_exit_files_and_a_signed_statement(assets, signed, capsys):
    assert exit_files(signed) == ("0\n", "accept\n")
    report = read(signed, "report.json")
    st = read(signed, "attestation.json")
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://backdoor-gate.dev/attestation/v1"
    sha = hashlib.sha256((assets / "tiny.onnx").read_bytes()).hexdigest()
    assert st["subject"] == [{"name": "tiny.onnx", "digest": {"sha256": sha}}]
    p = st["predicate"]
    keys = ("outcome", "exit_code", "reasons", "model_p_value", "backdoor_score", "clean_reference")
    assert {k: p["decision"][k] for k in keys} == {k: report["decision"][k] for k in keys}
    assert p["classes"] == [{k: c[k] for k in ("label", "l1", "flagged", "p_value")} for c in report["classes"]]
    canonical = json.dumps(report["policy"], sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert p["policy"]["sha256"] == hashlib.sha256(canonical).hexdigest()
    assert p["policy"]["effective"] == report["policy"] and p["policy"]["file"] == str(assets / "accept.yaml")
    assert p["data"]["source"] == str(assets / "data.npz")
    assert p["data"]["sha256"] == hashlib.sha256((assets / "data.npz").read_bytes()).hexdigest()
    import onnxruntime

    assert p["runtime"]["numpy"] == np.__version__ and p["runtime"]["onnxruntime"] == onnxruntime.__version__
    assert p["tool"]["name"] == "backdoor-gate" and p["tool"]["version"]
    assert ISO.match(p["run"]["started"]) and ISO.match(p["run"]["finished"])
    assert p["run"]["started"] <= p["run"]["finished"]
    assert p["run"]["command"][:2] == ["gate", "run"] and "--sign-key" in p["run"]["command"]

    env = read(signed, "attestation.dsse.json")
    assert env["payloadType"] == "application/vnd.in-toto+json"
    body = base64.b64decode(env["payload"])
    assert body == (signed / "attestation.json").read_bytes()
    public = serialization.load_pem_public_key((assets / "sign.pub.pem").read_bytes())
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    [sig] = env["signatures"]
    assert sig["keyid"] == hashlib.sha256(der).hexdigest()
    ptype = env["payloadType"].encode()
    public.verify(base64.b64decode(sig["sig"]), b"DSSEv1 %d %s %d %s" % (len(ptype), ptype, len(body), body))

    code, stdout, _ = gate(capsys, "verify", assets / "tiny.onnx", signed, "--key", assets / "sign.pub.pem")
    assert code == 0 and stdout.startswith("verified: ACCEPT (exit 0)") and stdout.count("\n") == 1
    assert f"signed by key {sig['keyid'][:16]}" in stdout


def test_reject_writes_exit_files_and_verify_exits_1(assets, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout = run(capsys, assets, out, "reject.yaml")
    assert code == 1 and stdout.startswith("REJECT:")
    assert exit_files(out) == ("1\n", "reject\n")
    st = read(out, "attestation.json")
    assert st["predicate"]["decision"]["outcome"] == "reject" and st["predicate"]["decision"]["exit_code"] == 1
    assert not (out / "attestation.dsse.json").exists()
    code, stdout, _ = gate(capsys, "verify", assets / "tiny.onnx", out)
    assert code == 1 and stdout.startswith("verified: REJECT (exit 1)") and "signature not checked" in stdout


def test_error_run_writes_exit_files_and_an_error_statement(assets, signed, tmp_path, capsys):
    out = copy(signed, tmp_path)  # an earlier accept in the folder must not survive
    code, stdout, _ = gate(capsys, "run", assets / "tiny.onnx", "--policy", assets / "accept.yaml", "--out", out,
                           "--data", assets / "missing.npz", *FAST, "--sign-key", assets / "sign.pem")
    assert code == 2 and stdout.startswith("ERROR:")
    assert exit_files(out) == ("2\n", "error\n")
    st = read(out, "attestation.json")
    p = st["predicate"]
    assert p["decision"]["outcome"] == "error" and p["decision"]["exit_code"] == 2
    assert "data not found" in p["error"] and p["classes"] == []
    assert st["subject"][0]["digest"]["sha256"] == hashlib.sha256((assets / "tiny.onnx").read_bytes()).hexdigest()
    assert p["policy"]["sha256"] and p["data"] == {"source": "file", "path": str(assets / "missing.npz"),
                                                   "sha256": None}
    code, stdout, _ = gate(capsys, "verify", assets / "tiny.onnx", out, "--key", assets / "sign.pub.pem")
    assert code == 2 and stdout.startswith("verified: ERROR (exit 2)")


def test_an_unreadable_policy_still_writes_exit_files_and_an_attestation(assets, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = gate(capsys, "run", assets / "tiny.onnx", "--policy", tmp_path / "none.yaml", "--out", out, *FAST)
    assert code == 2 and exit_files(out) == ("2\n", "error\n")
    p = read(out, "attestation.json")["predicate"]
    assert p["decision"]["outcome"] == "error" and p["policy"]["sha256"] is None


def test_interrupted_at_the_claim(assets, signed, tmp_path, capsys, monkeypatch):
    import gate.commands.run as run_command

    out = copy(signed, tmp_path)
    seen = {}

    def interrupted(*a, **k):  # right after the claim, before the model is opened
        seen["files"] = exit_files(out)
        seen["report"] = read(out, "report.json")["decision"]["outcome"]
        seen["names"] = {p.name for p in out.iterdir()}
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(run_command, "open_oracle", interrupted)
    code, stdout = run(capsys, assets, out)
    assert seen["files"] == (None, "running\n"), "the claim says running and removes the earlier exit code"
    assert seen["report"] == "running"
    assert not {"attestation.json", "attestation.dsse.json"} & seen["names"]
    assert code == 2 and stdout.startswith("ERROR: scan failed: interrupted (SIGTERM)")
    assert exit_files(out) == ("2\n", "error\n")
    assert "interrupted" in read(out, "attestation.json")["predicate"]["error"]
    assert not (out / "attestation.dsse.json").exists(), "the earlier run's signature is gone"


def test_a_usage_error_after_the_claim_leaves_usage_not_running(assets, tmp_path, capsys):
    linear_model(tmp_path / "gray.onnx", size=8, channels=1, classes=5)
    out = tmp_path / "out"
    code, _, err = gate(capsys, "run", tmp_path / "gray.onnx", "--policy", assets / "accept.yaml", "--out", out,
                        "--data", assets / "data.npz", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2", *FAST)
    assert code == 4 and "the model has 1 channels" in err
    assert exit_files(out) == ("4\n", "usage\n")


@pytest.mark.parametrize("key,message", [("missing.pem", "--sign-key"), ("ec.pem", "an ed25519 key is needed")])
def test_a_bad_sign_key_is_a_usage_error_before_any_query(assets, tmp_path, capsys, key, message):
    code, stdout, err = gate(capsys, "run", assets / "tiny.onnx", "--policy", assets / "accept.yaml", "--out",
                             tmp_path / "out", "--sign-key", assets / key, *FAST)
    assert code == 4 and message in err and stdout == ""
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- gate verify refuses
def _rewrite(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _forge_payload(env: dict) -> None:
    st = json.loads(base64.b64decode(env["payload"]))
    st["predicate"]["decision"]["reasons"] = ["nothing to see"]
    env["payload"] = base64.b64encode(json.dumps(st).encode()).decode()


def test_verify_refuses_a_tampered_model(assets, signed, tmp_path, capsys):
    model = tmp_path / "tiny.onnx"
    model.write_bytes((assets / "tiny.onnx").read_bytes() + b"\0")
    code, stdout, _ = gate(capsys, "verify", model, signed, "--key", assets / "sign.pub.pem")
    assert code == 2 and stdout.startswith("gate verify: FAILED: model digest") and stdout.count("\n") == 1


@pytest.mark.parametrize("tamper,key,message", [
    (lambda out: _rewrite(out / "attestation.dsse.json", _forge_payload), "sign.pub.pem", "no signature"),
    (lambda out: _rewrite(out / "attestation.json", lambda d: d["predicate"]["decision"].update(reasons=["x"])),
     "sign.pub.pem", "not the signed payload"),
    (lambda out: (out / "attestation.dsse.json").unlink(), "sign.pub.pem", "refuses an unsigned one"),
    (lambda out: None, "other.pub.pem", "no signature of the envelope verifies"),
    (lambda out: _rewrite(out / "report.json", lambda d: d["decision"].update(outcome="reject", exit_code=1)),
     None, "report.json's outcome is 'reject'"),
    (lambda out: _rewrite(out / "report.json", lambda d: d["policy"]["search"].update(max_steps=999)),
     None, "report.json's effective policy is not the attested one"),
    (lambda out: _rewrite(out / "attestation.json", lambda d: d["predicate"]["decision"].update(exit_code=1)),
     None, "exit code 1 is not that of outcome accept"),
    (lambda out: (out / "attestation.json").unlink(), None, "no attestation"),
])
def test_verify_refuses_a_tampered_folder(assets, signed, tmp_path, capsys, tamper, key, message):
    out = copy(signed, tmp_path)
    tamper(out)
    code, stdout, _ = gate(capsys, "verify", assets / "tiny.onnx", out, *(["--key", assets / key] if key else []))
    assert code == 2 and stdout.startswith("gate verify: FAILED:") and message in stdout, stdout


def test_verify_accepts_url_safe_unpadded_base64(assets, signed, tmp_path, capsys):
    out = copy(signed, tmp_path)

    def url_safe(env):
        def enc(text):
            return base64.urlsafe_b64encode(base64.b64decode(text)).decode().rstrip("=")
        env["payload"] = enc(env["payload"])
        env["signatures"][0]["sig"] = enc(env["signatures"][0]["sig"])

    _rewrite(out / "attestation.dsse.json", url_safe)
    code, _, _ = gate(capsys, "verify", assets / "tiny.onnx", out, "--key", assets / "sign.pub.pem")
    assert code == 0


@pytest.mark.parametrize("args", [["missing.onnx", "OUT"], ["tiny.onnx", "nowhere"],
                                  ["tiny.onnx", "OUT", "--key", "missing.pem"],
                                  ["tiny.onnx", "OUT", "--key", "ec.pem"]])
def test_verify_usage_errors_exit_4(assets, signed, capsys, args):
    args = [str(signed) if a == "OUT" else str(assets / a) if a != "--key" else a for a in args]
    code, _, err = gate(capsys, "verify", *args)
    assert code == 4 and "usage error" in err


# --------------------------------------------------------------------------- README
def test_readme_ci_jobs_call_gate_run_and_keep_the_reports():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## CI\n", 1)[1].split("\n## ", 1)[0]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    github = next(b for b in blocks if "jobs" in b)
    gitlab = next(b for b in blocks if "jobs" not in b)
    steps = next(iter(github["jobs"].values()))["steps"]
    script = "\n".join(s.get("run", "") for s in steps)
    assert "gate run" in script and "exit" in script
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("github/codeql-action/upload-sarif") for u in uses)
    assert any(s.get("with", {}).get("sarif_file", "").endswith("report.sarif") for s in steps)
    assert any(u.startswith("actions/upload-artifact") for u in uses)
    job = next(v for k, v in gitlab.items() if isinstance(v, dict) and "script" in v and
               any("gate run" in line for line in v["script"]))
    assert job["allow_failure"] == {"exit_codes": [3]}
    assert job["artifacts"]["when"] == "always" and job["artifacts"]["reports"]["junit"].endswith("junit.xml")


def _ci_blocks() -> tuple[dict, dict]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## CI\n", 1)[1].split("\n## ", 1)[0]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    return next(b for b in blocks if "jobs" in b), next(b for b in blocks if "jobs" not in b)


def _ci_workspace(assets: Path, tmp_path: Path, policy: str) -> tuple[Path, dict]:
    """A checkout as the CI jobs see it: the model, the data, policies/default.yaml (here a cheap one, so the
    job runs in seconds) and the public key; the environment with the gate on PATH."""
    import os
    import sys

    ws = tmp_path / "ws"
    (ws / "policies").mkdir(parents=True)
    shutil.copy(assets / "tiny.onnx", ws / "tiny.onnx")
    shutil.copy(assets / "data.npz", ws / "data.npz")
    cheap = {"search": {"k": 6, "batch_size": 4, "max_steps": 15}, "data": {"max_images": 100}}
    doc = yaml.safe_load((assets / policy).read_text())
    for key, value in cheap.items():
        doc.setdefault(key, {}).update(value)
    (ws / "policies" / "default.yaml").write_text(yaml.safe_dump(doc))
    shutil.copy(assets / "sign.pub.pem", ws / "gate.pub.pem")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MODEL": "tiny.onnx", "DATA": "data.npz", "BACKDOOR_GATE_CACHE": "off"}
    return ws, env


def _bash(script: str, ws: Path, env: dict):
    import subprocess

    return subprocess.run(["bash", "-e", "-c", script], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=600)


def _without_install(line: str) -> str:
    """A job's command without its `pip install .` (the gate is installed here already)."""
    return line.replace("pip install . && ", "") if line.strip() != "pip install ." else ""


@pytest.mark.parametrize("policy,code", [("accept.yaml", 0), ("reject.yaml", 1)])
def test_readme_github_actions_job_runs_as_written(assets, tmp_path, policy, code):
    github, _ = _ci_blocks()
    gate_job, deploy = github["jobs"]["gate"], github["jobs"]["deploy"]
    step = next(s for s in gate_job["steps"] if s.get("id") == "gate")
    ws, env = _ci_workspace(assets, tmp_path, policy)
    outputs = tmp_path / "github_output"
    env.update(SIGNING_KEY=(assets / "sign.pem").read_text(), RUNNER_TEMP=str(tmp_path), GITHUB_OUTPUT=str(outputs))
    r = _bash(step["run"], ws, env)
    assert r.returncode == code, r.stderr[-2000:]  # a reject fails the job with the gate's code
    assert outputs.read_text().strip() == f"exit_code={code}"
    for name in ("report.sarif", "junit.xml", "report.html", "attestation.json"):  # what the upload steps take
        assert (ws / "gate-out" / name).is_file(), name
    assert any(p.name.endswith(".dsse.json") or "dsse" in p.name for p in (ws / "gate-out").iterdir())
    # the deploy job runs only on exit_code '0'; its verify then passes for the signed accept
    assert deploy["if"] == "needs.gate.outputs.exit_code == '0'"
    verify = _bash("\n".join(_without_install(s["run"]) for s in deploy["steps"] if "run" in s), ws, env)
    assert verify.returncode == code, verify.stderr[-2000:]


def test_readme_gitlab_jobs_run_as_written(assets, tmp_path):
    _, gitlab = _ci_blocks()
    ws, env = _ci_workspace(assets, tmp_path, "accept.yaml")
    env["GATE_SIGNING_KEY"] = str(assets / "sign.pem")  # a File variable: its value is a path
    r = _bash("\n".join(_without_install(line) for line in gitlab["backdoor-gate"]["script"]), ws, env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (ws / gitlab["backdoor-gate"]["artifacts"]["reports"]["junit"]).is_file()
    verify = _bash("\n".join(_without_install(line) for line in gitlab["deploy-model"]["script"]), ws, env)
    assert verify.returncode == 0, verify.stderr[-2000:]
    (ws / "tiny.onnx").write_bytes((ws / "tiny.onnx").read_bytes() + b"\0")  # the model changed after the scan
    assert _bash("\n".join(_without_install(line) for line in gitlab["deploy-model"]["script"]), ws, env).returncode
