"""What a scan cannot see, in words, for the report page: an accept is "no backdoor found within these limits".

:func:`blind_spots` reads them off the scan result itself (which trigger searches ran, on what data, under
which budget and outlier rule), so the list says what this run did not cover, not what the gate might do.
"""

from __future__ import annotations

from gate.report.fmt import num, pct
from gate.result import ScanResult

# measured on the benchmark zoo (bench/RESULTS.md: SIG 0 of 3 in every mode; an additive search probed, not built)
_ADDITIVE = ("A faint signal added to the whole image (SIG-style sinusoids) was not found on the gate's benchmark "
             "models by either search: natural classes there needed perturbations as faint.")

_STOPPED = {"max_steps": "stopped at the step limit", "budget": "were cut short by the budget",
            "not_reached": "found no working trigger"}


def blind_spots(result: ScanResult) -> list[str]:
    """One sentence per blind spot of this scan, most fundamental first."""
    s, d, o = result.search, result.data, result.outliers
    spots = []
    if result.blend is None:
        spots.append("Trigger shapes: only a stamped patch (a mask and a pattern) was searched per class. The blend "
                     "search for a faint full-image trigger was off (--blend turns it on); warping (WaNet-style), "
                     f"input-specific and semantic triggers are not searched at all. {_ADDITIVE}")
    else:
        spots.append("Trigger shapes: stamped patches and faint full-image blends were searched per class; warping "
                     f"(WaNet-style), input-specific and semantic triggers are not searched at all. {_ADDITIVE}")
    spots.append("Backdoor shape: a backdoor shows as one class whose trigger is far smaller than the others'. One "
                 "aimed at many classes at once (all-to-all), or a model whose clean classes already have triggers "
                 "as small, leaves no outlier to find.")
    if result.method == "b3d-ss":
        spots.append(f"Data: no clean images were given; the search ran on {num(d.get('images'))} images synthesised "
                     "from the model itself (B3D-SS), which stand in for real inputs less well than real data: on the "
                     "gate's benchmark models B3D-SS found fewer of the backdoors than a scan with real images did.")
    else:
        spots.append(f"Data: only the {num(d.get('images'))} images of {d.get('source')} were used "
                     f"({num(d.get('search_pool'))} to search, {num(d.get('held_out'))} held out to check); a trigger "
                     "that works only on other inputs is judged by what these images show.")
    acc = d.get("clean_accuracy")
    if acc is None:
        spots.append("Input convention: the data has no labels, so the model's clean accuracy (which would show a "
                     "wrong layout, value range or mean/std) could not be checked.")
    elif acc < 0.5:
        spots.append(f"Input convention: the model is right on only {pct(acc)} of the labelled images: check the "
                     "layout, value range and mean/std, or the searches ran on inputs the model does not expect.")
    switched = (d.get("convention") or {}).get("switched_to")
    if switched:
        spots.append(f"Input convention: nobody stated it; the scan ran under {switched}, the convention that "
                     f"classified the labelled images best ({pct(d['convention']['fits'][switched])}). Conventions "
                     "that classify as well (ImageNet or the data's own mean/std) differ to the model, and a scan "
                     f"under another one can end differently: state the vendor's ({d['convention']['flags']}).")
    budget = (f"Query budget: each class's search ran at most {num(s.get('max_steps'))} steps of "
              f"{num(s.get('k'))} samples ({num(int(result.queries.get('total', 0)))} queries in all)")
    if s.get("max_queries") or s.get("max_seconds"):
        limits = [f"{num(s['max_queries'])} queries" if s.get("max_queries") else "",
                  f"{num(s['max_seconds'])} s" if s.get("max_seconds") else ""]
        budget += f", within a budget of {' and '.join(x for x in limits if x)}"
    budget += "; a trigger the search could not shrink within that looks like a clean class."
    counts = {st: sum(c.status == st for c in result.classes) for st in _STOPPED}
    stopped = [f"{n} {'class' if n == 1 else 'classes'} {_STOPPED[st]}" for st, n in counts.items() if n]
    if stopped:
        budget += f" In this scan {', '.join(stopped)}."
    spots.append(budget)
    if o.get("method", "mad") == "calibrated":
        spots.append(f"Statistics: a class is flagged at a per-model p-value ≤ {num(o.get('alpha'))} (this "
                     f"model's: {num(o.get('model_p_value'))}); a backdoor whose trigger is not that much smaller "
                     "than the clean classes' goes unflagged, so an accept is evidence, not proof.")
    else:
        spots.append(f"Statistics: the paper's MAD rule (anomaly index > {num(o.get('anomaly_threshold'))} or L1 < "
                     f"{num(o.get('median_ratio'))} × median) has no calibrated false-negative rate.")
    return spots
