"""``junit.xml``: one test suite, one test case per class, so CI dashboards show the gate like tests.

A class fails (``<failure>``) when a rule that asks for rejection or review fired for it, and errors
(``<error>``) when a budget cut its search short. Findings about the whole model (incomplete scan,
inconclusive search) fail one more test case named ``scan``; a scan that failed altogether is that
``scan`` test case with an ``<error>``. The suite's properties carry the decision.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from gate.decision import Decision
from gate.result import ScanResult


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def junit_xml(result: ScanResult | None, decision: Decision, model: dict | None = None) -> str:
    model = model or (result.model if result is not None else {})
    stem = Path(str(model.get("path") or "model")).stem
    suites = ET.Element("testsuites", name="backdoor-gate")
    suite = ET.SubElement(suites, "testsuite", name=f"backdoor-gate {stem}")
    props = ET.SubElement(suite, "properties")
    for name, value in (("decision", decision.outcome), ("exit_code", decision.exit_code),
                        ("model", model.get("path", "")), ("sha256", model.get("sha256", "")),
                        *((f"reason.{i}", r) for i, r in enumerate(decision.reasons, 1))):
        ET.SubElement(props, "property", name=name, value=str(value))
    classname = f"backdoor_gate.{stem}"
    tests = failures = errors = 0
    total_time = 0.0
    if result is None:
        case = ET.SubElement(suite, "testcase", name="scan", classname=classname, time="0")
        err = ET.SubElement(case, "error", message=decision.reasons[0] if decision.reasons else "scan failed",
                            type="BG004")
        err.text = "\n".join(decision.reasons)
        tests, errors = 1, 1
    else:
        by_class: dict[int, list] = {}
        for f in decision.findings:
            if f.label is not None:
                by_class.setdefault(f.label, []).append(f)
        for c in sorted(result.classes, key=lambda c: c.label):
            tests += 1
            total_time += c.seconds
            case = ET.SubElement(suite, "testcase", name=f"class {c.label}", classname=classname,
                                 time=f"{c.seconds:.3f}")
            numbers = (f"L1 {_fmt(c.l1)}, binary L1 {c.binary_l1}, mask fraction {_fmt(c.mask_fraction)}, "
                       f"anomaly index {_fmt(c.anomaly_index)}, trigger ASR {_fmt(c.trigger_asr)}, "
                       f"status {c.status}, steps {c.steps}, queries {c.queries}" + (f"; {c.note}" if c.note else ""))
            found = by_class.get(c.label, [])
            if found:
                failures += 1
                fail = ET.SubElement(case, "failure", message="; ".join(f.message for f in found),
                                     type=",".join(sorted({f.rule for f in found})))
                fail.text = "\n".join([*(f.message for f in found), numbers])
            elif c.status == "budget":
                errors += 1
                err = ET.SubElement(case, "error", type="BG002",
                                    message=f"search cut short by the budget: {result.stop_reason}")
                err.text = numbers
            else:
                out = ET.SubElement(case, "system-out")
                out.text = numbers
        model_level = [f for f in decision.findings if f.label is None]
        if model_level:
            tests += 1
            failures += 1
            case = ET.SubElement(suite, "testcase", name="scan", classname=classname, time="0")
            fail = ET.SubElement(case, "failure", message="; ".join(f.message for f in model_level),
                                 type=",".join(sorted({f.rule for f in model_level})))
            fail.text = "\n".join(f.message for f in model_level)
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("skipped", "0")
    suite.set("time", f"{total_time:.3f}")
    suites.set("tests", str(tests))
    suites.set("failures", str(failures))
    suites.set("errors", str(errors))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
