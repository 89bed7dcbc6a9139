"""What a reader must know about how a verdict was reached, besides the verdict: it came from the cache, or
the scan fell back to synthetic samples. The same sentences go into report.json (``decision.notes``), onto
the console and to the top of report.html.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from gate.result import ScanResult, atomic_write


def run_notes(result: ScanResult, cache: dict | None) -> list[str]:
    """The notes of one finished run (``cache``: the run's cache record, :mod:`gate.commands.verdict_cache`)."""
    notes = []
    if cache and cache.get("status") == "hit":
        notes.append(f"Answered from the verdict cache: this run sent no query. The scan was made at "
                     f"{cache.get('scanned')} ({cache.get('scan_queries', 0):,} queries) for the same model bytes, "
                     f"data, effective policy, tool and seed (cache key {str(cache.get('key'))[:16]}...); "
                     f"--no-cache scans again.")
    fallback = result.data.get("fallback")
    if fallback:
        notes.append(f"No clean data was scanned: {fallback}. B3D-SS is the weaker method; give the model's own "
                     f"clean images with --data for a B3D scan.")
    return notes


_BODY = re.compile(r"<body[^>]*>", re.IGNORECASE)


def with_notes(page: str, notes: list[str]) -> str:
    """``page`` with the notes as a box at the top of its body.

    >>> page = with_notes("<html><body><p>x</p></body></html>", ["a < b"])
    >>> page.startswith('<html><body><div class="gate-notes"'), "<p>a &lt; b</p></div><p>x</p>" in page
    (True, True)
    """
    if not notes:
        return page
    box = ('<div class="gate-notes" role="note" style="max-width:1100px;margin:12px auto 0;padding:10px 16px;'
           'border:1px solid #b45309;border-left:8px solid #b45309;border-radius:8px;background:#fffbeb;'
           'font:15px/1.45 system-ui,sans-serif;color:#1f2937">'
           + "".join(f"<p>{html.escape(n)}</p>" for n in notes) + "</div>")
    m = _BODY.search(page)
    at = m.end() if m else 0
    return page[:at] + box + page[at:]


def add_notes(path: str | Path, notes: list[str]) -> None:
    """Put the notes at the top of the report page at ``path`` (rewritten atomically)."""
    if notes and Path(path).is_file():
        atomic_write(path, with_notes(Path(path).read_text(), notes))
