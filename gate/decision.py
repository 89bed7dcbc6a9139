"""The gate's decision: a pure function of a scan result and a policy.

``decide(result, policy)`` never touches the model, the clock or the disk: the same result and policy
always give the same :class:`Decision`. Outcomes and exit codes (as protectai/modelscan):

    accept 0   the scan completed and no rule fired
    reject 1   a rule asks for rejection
    error  2   the scan failed (fail closed; ``on_error: reject`` makes it 1)
    review 3   the scan could not reach a verdict (budget, searches that did not work), or a rule
               asks for a human: a person must look, which is not the same as a crash
    usage  4   the command line was wrong (argparse), not a decision

This table (:data:`EXIT_CODES`, :data:`EXIT_USAGE`) is the only one: every command exits through it.

Rules (SARIF ids): BG001 a class is flagged by the outlier rule (on its patch trigger's L1, or, when the
scan ran the blend mode, on its blend trigger's amplitude: one finding per mode); BG003 a small reversed
trigger sends most held-out images to its class; BG005 the searches did not work (too many classes without
a working trigger, or masks that never shrank); BG002 a budget cut the scan short; BG006 the model
misclassifies its labelled clean data (below ``rules.min_clean_accuracy``: not this model's data, or the
wrong input convention). Flags of an incomplete
or inconclusive scan are provisional (outcome ``rules.incomplete``); BG003 is direct evidence and always
rejects. Every rule outcome is reject or review, so no policy turns a finding into an accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gate.blend import blend_outliers
from gate.outliers import MAD_CONSISTENCY, find_outliers, finite_index
from gate.reference import Standing, load, standing
from gate.result import ScanResult

OUTCOMES = ("accept", "reject", "review", "error")
EXIT_CODES = {"accept": 0, "reject": 1, "error": 2, "review": 3}
EXIT_USAGE = 4


def exit_code_help() -> str:
    """The exit-code table in words, for help texts and reports: "0 accept, 1 reject, ... 4 usage error"."""
    return ", ".join(f"{code} {name}" for name, code in EXIT_CODES.items()) + f", {EXIT_USAGE} usage error"
_SEVERITY = {"accept": 0, "review": 1, "reject": 2}

# Rules, as SARIF rule ids.
RULE_FLAGGED = "BG001"
RULE_INCOMPLETE = "BG002"
RULE_SMALL_TRIGGER = "BG003"
RULE_ERROR = "BG004"
RULE_WEAK_SEARCH = "BG005"
RULE_LOW_ACCURACY = "BG006"
RULES = {
    RULE_FLAGGED: ("backdoor-class-flagged",
                   "A class's reversed trigger is an outlier: much smaller than the other classes' triggers."),
    RULE_INCOMPLETE: ("scan-incomplete", "A budget ran out before the scan could reach a verdict."),
    RULE_SMALL_TRIGGER: ("small-effective-trigger",
                         "A small reversed trigger sends most clean images to one class."),
    RULE_ERROR: ("scan-error", "The scan could not be run."),
    RULE_WEAK_SEARCH: ("search-inconclusive",
                       "The trigger searches did not work well enough for the outlier test to clear the model."),
    RULE_LOW_ACCURACY: ("clean-accuracy-low",
                        "The model misclassifies too much of the labelled clean data for the scan to clear it."),
}
UNREACHED = "not_reached"  # search status: no trigger reached the success threshold


@dataclass(frozen=True)
class Finding:
    """One rule that fired: which, for which class (None: the whole model), asking for what."""

    rule: str
    outcome: str  # reject | review | error
    message: str
    label: int | None = None
    properties: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {"rule": self.rule, "name": RULES[self.rule][0], "outcome": self.outcome, "class": self.label,
                "message": self.message, "properties": self.properties}


@dataclass(frozen=True)
class Decision:
    outcome: str  # accept | reject | review | error
    reasons: list[str]
    exit_code: int
    findings: list[Finding] = field(default_factory=list)
    # calibrated outlier rule: the chance a clean model shows a class this extreme, and 1 minus it (with the
    # blend mode: the smaller of the two modes' p-values, each of which flags at alpha)
    model_p_value: float | None = None
    # calibrated rule: where the patch rule's model p-value sits among clean reference models (gate.reference)
    clean_reference: Standing | None = None

    @property
    def backdoor_score(self) -> float | None:
        return None if self.model_p_value is None else 1.0 - self.model_p_value

    def to_dict(self) -> dict:
        d = {"outcome": self.outcome, "reasons": list(self.reasons), "exit_code": self.exit_code,
             "findings": [f.to_dict() for f in self.findings]}
        if self.model_p_value is not None:
            d.update(model_p_value=self.model_p_value, backdoor_score=self.backdoor_score)
        if self.clean_reference is not None:
            d["clean_reference"] = self.clean_reference.to_dict()
        return d

    @property
    def summary(self) -> str:
        """One line: the outcome and its reasons."""
        return f"{self.outcome.upper()}: " + "; ".join(self.reasons)

    @classmethod
    def error(cls, message: str, on_error: str = "error") -> Decision:
        """The decision for a run that failed: always fail closed."""
        code = EXIT_CODES["reject"] if on_error == "reject" else EXIT_CODES["error"]
        finding = Finding(RULE_ERROR, "error", message)
        return cls("error", [f"scan failed: {message}"], code, [finding])


def _num(x: float) -> str:
    """Numbers in sentences: 3 significant figures, no exponent for everyday magnitudes."""
    if x is None or not np.isfinite(x):
        return "inf" if x is not None and x > 0 else "-inf" if x is not None else "n/a"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.2g}"


def _pct(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def input_pixels(result: ScanResult) -> int | None:
    """Height x width of the scanned input (the outlier rule's population test needs it); None if unrecorded."""
    spec = result.input_spec or {}
    h, w = spec.get("height"), spec.get("width")
    return int(h) * int(w) if h and w else None


def decide(result: ScanResult, policy) -> Decision:
    """Apply ``policy.rules`` and ``policy.outliers`` to ``result``.

    The outlier rule is re-applied to the per-class L1 norms with the policy's thresholds, and to the blend
    amplitudes when every class has one (the scan ran the blend mode), so a stored result can be judged again
    under another policy; with the policy the scan ran under it gives the scan's own flags.
    """
    rules = policy.rules
    classes = sorted(result.classes, key=lambda c: c.label)
    if len(classes) < 2:
        return Decision.error(f"the result holds {len(classes)} classes; at least 2 are needed",
                              policy.on_error)
    l1 = np.array([c.l1 for c in classes], dtype=np.float64)
    reference = (np.array([bool(c.reference) for c in classes]) if any(c.reference is not None for c in classes)
                 else None)  # a screened scan: the statistics come from its reference classes (gate.screening)
    out = find_outliers(l1, policy.outlier_rule(), reference=reference, pixels=input_pixels(result))
    median = out.median
    model_p = out.model_p_value if out.method == "calibrated" else None
    blend = None
    if all(c.blend_amplitude is not None for c in classes):
        blend = blend_outliers(np.array([c.blend_amplitude for c in classes], np.float64), policy.outlier_rule(),
                               policy.blend_params())
        if model_p is not None:
            model_p = min(model_p, blend.model_p_value)
    clean_reference = (standing(out.model_p_value, policy.outlier_rule(), result.search, result.method,
                                input_pixels(result), blend is not None, load())
                       if out.method == "calibrated" else None)
    weak = _weak_search(classes, rules)
    # flags of a scan that is incomplete or whose searches did not work are provisional
    provisional = ("" if result.complete and not weak else
                   " (provisional: the scan is incomplete)" if not result.complete else
                   " (provisional: the search was inconclusive)")
    findings: list[Finding] = []

    flagged = [(c, finite_index(idx), pv) for c, idx, pv, f
               in zip(classes, out.anomaly_index, out.p_values, out.flagged, strict=True) if f]
    flagged.sort(key=lambda t: (-t[1], t[0].label))
    for c, idx, pv in flagged:
        outcome = rules.incomplete if provisional else rules.flagged
        evidence = {"l1": c.l1, "anomaly_index": idx, "median_l1": median, "trigger_asr": c.trigger_asr,
                    "mask_fraction": c.mask_fraction}
        if out.method == "calibrated":
            evidence["p_value"] = float(pv)
        findings.append(Finding(RULE_FLAGGED, outcome, f"class {c.label} flagged: {_why(c, idx, pv, out, classes)}"
                                f"{provisional}", c.label, evidence))
    if blend is not None:
        flagged = [(c, finite_index(idx), pv) for c, idx, pv, f
                   in zip(classes, blend.anomaly_index, blend.p_values, blend.flagged, strict=True) if f]
        flagged.sort(key=lambda t: (-t[1], t[0].label))
        for c, idx, pv in flagged:
            outcome = rules.incomplete if provisional else rules.flagged
            evidence = {"mode": "blend", "blend_amplitude": c.blend_amplitude, "anomaly_index": idx,
                        "median_amplitude": blend.median, "blend_asr": c.blend_asr}
            if blend.method == "calibrated":
                evidence["p_value"] = float(pv)
            findings.append(Finding(RULE_FLAGGED, outcome, f"class {c.label} flagged: {_why_blend(c, idx, pv, blend)}"
                                    f"{provisional}", c.label, evidence))

    small = rules.small_trigger
    if small is not None:  # direct evidence: rejects even when the scan is incomplete
        for c in classes:
            if c.trigger_asr is not None and c.trigger_asr >= small.min_asr \
                    and c.mask_fraction < small.max_mask_fraction:
                findings.append(Finding(
                    RULE_SMALL_TRIGGER, "reject",
                    f"class {c.label}: a reversed trigger covering {_pct(c.mask_fraction, 1)} of the image "
                    f"(under {_pct(small.max_mask_fraction, 1)}) sends {_pct(c.trigger_asr)} of held-out images "
                    f"to it (at least {_pct(small.min_asr)})",
                    c.label, {"l1": c.l1, "trigger_asr": c.trigger_asr, "mask_fraction": c.mask_fraction}))

    findings += weak + _low_accuracy(result, rules)
    if not result.complete:
        cut = [c.label for c in classes if c.status == "budget"]
        what = f"; {len(cut)} of {len(classes)} classes were cut short" if cut else ""
        findings.append(Finding(RULE_INCOMPLETE, rules.incomplete,
                                f"scan incomplete: {result.stop_reason or 'budget reached'}{what}",
                                None, {"stop_reason": result.stop_reason, "cut_short": cut}))

    if not findings:
        i = int(np.argmax(out.anomaly_index))
        c = classes[i]
        reason = (f"no class flagged among {len(classes)}: the most suspicious is class {c.label} "
                  f"({_why(c, finite_index(out.anomaly_index[i]), out.p_values[i], out, classes)})")
        if blend is not None:
            i = int(np.argmax(blend.anomaly_index))
            c = classes[i]
            reason += (f"; by its blend trigger, class {c.label} "
                       f"({_why_blend(c, finite_index(blend.anomaly_index[i]), blend.p_values[i], blend)})")
        return Decision("accept", [reason], EXIT_CODES["accept"], [], model_p, clean_reference)
    outcome = max((f.outcome for f in findings), key=lambda o: _SEVERITY[o])
    return Decision(outcome, [f.message for f in findings], EXIT_CODES[outcome], findings, model_p, clean_reference)


def _why(c, idx: float, p_value: float, out, classes: list) -> str:
    """A class's outlier evidence in words, for the rule that judged it."""
    ratio = f"{c.l1 / out.median:.2f}x the median {_num(out.median)}" if out.median > 0 else "against a median of 0"
    if out.method == "calibrated" and out.within_z is not None:
        i = classes.index(c)
        return (f"L1 {_num(c.l1)} is {ratio} and {_pct(c.mask_fraction, 1)} of the image, z {_num(idx)} in log L1 "
                f"(against the other classes {_num(finite_index(out.within_z[i]))}, against clean models' classes "
                f"{_num(float(out.population_z[i]))}), p-value {p_value:.2g} per model")
    if out.method == "calibrated":
        return (f"L1 {_num(c.l1)} is {ratio}, z {_num(idx)} in log L1 against the other classes, p-value "
                f"{p_value:.2g} per model")
    return f"L1 {_num(c.l1)} is {ratio} (MAD anomaly index {_num(idx)})"


def _why_blend(c, idx: float, p_value: float, out) -> str:
    """A class's outlier evidence from its blend trigger's amplitude, in words."""
    a = c.blend_amplitude
    ratio = f"{a / out.median:.2f}x the median {_num(out.median)}" if out.median > 0 else "against a median of 0"
    what = f"blend trigger amplitude {_num(a)} (attack success {_pct(c.blend_asr)}) is {ratio}"
    if out.method == "calibrated":
        return f"{what}, z {_num(idx)} in log amplitude against the other classes, p-value {p_value:.2g} per model"
    return f"{what} (MAD anomaly index {_num(idx)})"


def _weak_search(classes: list, rules) -> list[Finding]:
    """Findings when the trigger searches did not work well enough to trust the outlier test."""
    weak = rules.weak_search
    if weak is None:
        return []
    found = []
    # screened: the reference classes, a random sample searched to convergence, stand for all (a screened-out
    # class's mask is an upper bound, and one that never worked in its screening steps is not "unreached")
    searched = [c for c in classes if c.reference] or classes
    unreached = [c.label for c in searched if c.status == UNREACHED]
    frac = len(unreached) / len(searched)
    if frac > weak.max_unreached_fraction:
        of = f"{len(searched)} reference classes" if len(searched) < len(classes) else f"{len(classes)} classes"
        found.append(Finding(
            RULE_WEAK_SEARCH, rules.incomplete,
            f"search inconclusive: {len(unreached)} of {of} found no working trigger "
            f"(more than {_pct(weak.max_unreached_fraction)}); give the search more steps"
            + next((f" (class {c.label}: {c.note})" for c in searched if c.status == UNREACHED and c.note), ""),
            None, {"unreached": unreached, "unreached_fraction": frac}))
    median_mask = float(np.median([c.mask_fraction for c in searched]))
    if median_mask > weak.max_median_mask_fraction:
        found.append(Finding(
            RULE_WEAK_SEARCH, rules.incomplete,
            f"search inconclusive: the median class's reversed trigger covers {_pct(median_mask)} of the "
            f"image (more than {_pct(weak.max_median_mask_fraction)}); the masks did not shrink",
            None, {"median_mask_fraction": median_mask}))
    return found


def _low_accuracy(result: ScanResult, rules) -> list[Finding]:
    """A finding when the model classifies too little of the labelled clean data correctly (B3D only: B3D-SS's
    labels are the classes its images were synthesised for)."""
    least = rules.min_clean_accuracy
    accuracy = result.data.get("clean_accuracy")
    if least is None or accuracy is None or result.method != "b3d" or accuracy >= least:
        return []
    check = result.data.get("convention") or {}
    fits = check.get("fits") or {}
    best = max(fits, key=fits.get) if fits else None
    measured = (f"; the convention check measured {len(fits)} conventions on {check.get('images')} of the images, "
                f"the best {best} at {_pct(fits[best])}" if best else "")
    return [Finding(
        RULE_LOW_ACCURACY, rules.incomplete,
        f"clean accuracy {_pct(accuracy, 1)} on {result.data.get('source')} is below {_pct(least)} "
        f"(rules.min_clean_accuracy): the data is not this model's, or its input convention (range, layout, "
        f"mean/std) is wrong{measured}; `gate inspect MODEL --data DATA` compares the conventions",
        None, {"clean_accuracy": accuracy, "min_clean_accuracy": least})]


def mad_threshold_l1(median: float, mad: float, anomaly_threshold: float) -> float:
    """The L1 below which a class's anomaly index exceeds the threshold: median - t * 1.4826 * MAD."""
    return median - anomaly_threshold * MAD_CONSISTENCY * mad
