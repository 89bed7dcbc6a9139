"""Renderers over one scan result + decision + effective policy (modelscan style).

``write_reports`` writes everything a run leaves in its output folder:

    report.json    ScanResult.to_dict() + decision + effective policy     (gate.report.jsonfile)
    report.html    one self-contained page                                (gate.report.htmlpage)
    report.sarif   SARIF 2.1.0                                            (gate.report.sarif)
    junit.xml      one test case per class                                (gate.report.junit)
    triggers.npz   every class's reversed trigger (Triggers.save), for the proxy
    trigger_<class>.png   mask x pattern of each flagged class, upscaled
    attestation.json      in-toto Statement of the decision (gate.report.attestation; written by gate run,
                          with attestation.dsse.json when it signs)
    exit_code, outcome    the CI contract (write_exit_files): the exit code and the outcome word

``write_error_reports`` writes the same files (but triggers) for a run that failed, so a pipeline that
looks for them finds a fail-closed verdict instead of nothing. Metrics are :mod:`gate.metrics`.

The output folder's contract: :func:`begin_run` checks the folder before any query, removes an earlier
run's reports and leaves a report.json whose outcome is ``running`` (exit code null); every file is then
written atomically (temp + rename), so a reader sees a finished report, the running marker, or a
fail-closed error report, never a stale accept or half a file.

For CI, ``OUT/outcome`` holds one word (``running`` from the claim on; then accept, reject, review or error,
or ``usage`` for a command line found wrong after the claim) and ``OUT/exit_code`` the process's exit code,
each followed by a newline. The claim removes ``exit_code``; at the end ``exit_code`` is written first and
``outcome`` last, so once ``outcome`` is not ``running`` the ``exit_code`` beside it is this run's.
"""

from __future__ import annotations

import json
from pathlib import Path

from gate import __version__
from gate.decision import Decision
from gate.errors import GateError
from gate.report.attestation import ATTESTATION, ENVELOPE, statement, write_attestation
from gate.report.htmlpage import render_html
from gate.report.images import png_bytes, trigger_views
from gate.report.jsonfile import report_dict, strict_json, write_report_json
from gate.report.junit import junit_xml
from gate.report.sarif import sarif_log
from gate.result import SCHEMA_VERSION, Example, ScanResult, Triggers, atomic_write

__all__ = ["begin_run", "write_reports", "write_scan_files", "write_error_reports", "write_exit_files",
           "statement", "write_attestation"]


def _summary(result: ScanResult) -> dict:
    return {"method": result.method, "classes": len(result.classes), "flagged": list(result.flagged),
            "complete": result.complete, "queries": int(result.queries.get("total", 0))}


def write_reports(out: str | Path, result: ScanResult, triggers: Triggers | None, decision: Decision,
                  policy: dict | None, *, examples: dict[int, list[Example]] | None = None,
                  policy_source: str | None = None, generated: str | None = None,
                  provenance: dict | None = None, class_names: list[str] | None = None,
                  command: list[str] | None = None, companions: list[str] | tuple[str, ...] = ()) -> dict[str, Path]:
    """``class_names`` (``--labels``) go into report.json, report.html and report.sarif; ``command`` is the
    command line report.html gives to reproduce the run; ``companions`` are the files the caller writes
    beside these afterwards (attestation.json, metrics.prom), which report.html links to as well."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("trigger_*.png"):  # from an earlier run into the same folder
        old.unlink()
    files = {name: out / name for name in ("report.json", "report.html", "report.sarif", "junit.xml")}
    write_report_json(files["report.json"], report_dict(result, decision, policy, provenance=provenance,
                                                        class_names=class_names))
    links = ["report.json", "report.sarif", "junit.xml", *(["triggers.npz"] if triggers is not None else []),
             *companions]
    atomic_write(files["report.html"], render_html(result, decision, policy, triggers=triggers, examples=examples,
                                                policy_source=policy_source, generated=generated,
                                                class_names=class_names, command=command, links=links))
    atomic_write(files["report.sarif"], json.dumps(strict_json(sarif_log(
        decision, result.model, result_summary=_summary(result), class_names=class_names)), indent=2) + "\n")
    atomic_write(files["junit.xml"], junit_xml(result, decision))
    if triggers is not None:
        files["triggers.npz"] = out / "triggers.npz"
        triggers.save(files["triggers.npz"])
        marked = {f.label for f in decision.findings if f.label is not None} | set(result.flagged)
        for i, label in enumerate(triggers.labels):
            if int(label) in marked:
                path = out / f"trigger_{int(label)}.png"
                atomic_write(path, png_bytes(trigger_views(triggers.masks[i], triggers.patterns[i])["trigger"], 128))
                files[path.name] = path
    return files


EXIT_CODE_FILE = "exit_code"
OUTCOME_FILE = "outcome"
RUN_FILES = ("report.json", "report.html", "report.sarif", "junit.xml", "triggers.npz", ATTESTATION, ENVELOPE)


def write_exit_files(out: str | Path, outcome: str, exit_code: int | None) -> None:
    """``OUT/exit_code`` (unless None: then removed) and then ``OUT/outcome``, atomically (the module docstring)."""
    out = Path(out)
    if exit_code is None:
        (out / EXIT_CODE_FILE).unlink(missing_ok=True)
    else:
        atomic_write(out / EXIT_CODE_FILE, f"{int(exit_code)}\n")
    atomic_write(out / OUTCOME_FILE, f"{outcome}\n")


def begin_run(out: str | Path, model: dict, policy: dict | None, *, started: str) -> Path:
    """Claim ``out`` for a new run (see the module docstring); a GateError when it cannot be one."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GateError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in (OUTCOME_FILE, EXIT_CODE_FILE, *RUN_FILES):  # the outcome first: no stale word beside no code
            (out / name).unlink(missing_ok=True)
        for old in out.glob("trigger_*.png"):
            old.unlink()
        doc = {"schema_version": SCHEMA_VERSION, "tool": {"name": "backdoor-gate", "version": __version__},
               "model": model, "status": "running", "started": started, "complete": False, "flagged": [],
               "decision": {"outcome": "running", "exit_code": None,
                            "reasons": [f"run started {started} and has not finished: no verdict yet"]},
               "policy": policy}
        write_report_json(out / "report.json", doc)
        write_exit_files(out, "running", None)
    except OSError as exc:
        raise GateError(f"--out {out} cannot be written: {exc.strerror or exc}") from None
    return out


def write_scan_files(out: str | Path, result: ScanResult, triggers: Triggers, decision: Decision,
                     policy: dict | None, *, provenance: dict | None = None,
                     class_names: list[str] | None = None) -> dict[str, Path]:
    """What ``gate scan`` writes: report.json (the same document as ``gate run``'s) and triggers.npz."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"report.json": out / "report.json", "triggers.npz": out / "triggers.npz"}
    write_report_json(files["report.json"], report_dict(result, decision, policy, provenance=provenance,
                                                        class_names=class_names))
    triggers.save(files["triggers.npz"])
    return files


def write_error_reports(out: str | Path, decision: Decision, policy: dict | None, model: dict, error: str, *,
                        policy_source: str | None = None, generated: str | None = None,
                        provenance: dict | None = None, renderers: bool = True, command: list[str] | None = None,
                        companions: list[str] | tuple[str, ...] = ()) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # stale results must not survive a failure (gate run writes the error attestation after this)
    for old in [*out.glob("trigger_*.png"), out / "triggers.npz", out / ATTESTATION, out / ENVELOPE]:
        if old.exists():
            old.unlink()
    files = {name: out / name for name in ("report.json", "report.html", "report.sarif", "junit.xml")}
    write_report_json(files["report.json"], report_dict(None, decision, policy, model=model, error=error,
                                                                provenance=provenance))
    if not renderers:
        return {"report.json": files["report.json"]}
    atomic_write(files["report.html"], render_html(None, decision, policy, model=model, policy_source=policy_source,
                                                generated=generated, command=command,
                                                links=["report.json", "report.sarif", "junit.xml", *companions]))
    atomic_write(files["report.sarif"], json.dumps(strict_json(sarif_log(decision, model)), indent=2) + "\n")
    atomic_write(files["junit.xml"], junit_xml(None, decision, model))
    return files
