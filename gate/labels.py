"""Class names for the reports (``--labels``): a text file with one name per line, or a JSON list of strings.

The names are presentation only: the scan and the decision never see them. A file that cannot be read, is
not UTF-8, holds an empty name or (:func:`check_count`) a different number of names than the model has
classes is a usage error with a one-line message, never a report with the wrong names.
"""

from __future__ import annotations

import json
from pathlib import Path

from gate.errors import UsageError


def parse_class_names(text: str, *, json_file: bool = False) -> list[str]:
    """The names in ``text``: a JSON list when ``json_file`` or when it starts with ``[``, else one per line
    (surrounding spaces and trailing empty lines dropped). ValueError names what is wrong.

    >>> parse_class_names("cat\\ndog\\n"), parse_class_names('["cat", "dog"]')
    (['cat', 'dog'], ['cat', 'dog'])
    """
    if json_file or text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("a JSON labels file must hold one list of strings")
        names = [n.strip() for n in names]
        where = "entry"
    else:
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
        where = "line"
    if not names:
        raise ValueError("no class names in it")
    empty = next((i for i, n in enumerate(names) if not n), None)
    if empty is not None:
        raise ValueError(f"{where} {empty + 1} is empty (every class needs a name)")
    return names


def read_class_names(path: str | Path) -> list[str]:
    """The names in the file ``path`` (JSON when it ends in ``.json``); a UsageError says why it cannot be."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise UsageError(f"--labels {path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--labels {path}: not UTF-8 text") from None
    try:
        return parse_class_names(text, json_file=str(path).lower().endswith(".json"))
    except ValueError as exc:
        raise UsageError(f"--labels {path}: {exc}") from None


def check_count(names: list[str], num_classes: int, path: str | Path) -> list[str]:
    """``names`` when there is one per class of the model; else a UsageError."""
    if len(names) != num_classes:
        raise UsageError(f"--labels {path}: {len(names)} class name{'s' if len(names) != 1 else ''} for a model "
                         f"with {num_classes} classes (one name per class, in class order)")
    return names
