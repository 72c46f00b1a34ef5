"""Training data: read a file or a local ``datasets`` folder, check its schema for a method, build a Dataset.

Sources: ``.jsonl`` (one JSON object a line), ``.json`` (a list of objects, or an object whose
``"train"`` or ``"data"`` key holds that list), ``.csv`` (strings; KTO labels as true/false/1/0),
``.parquet``, or a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
(its ``train`` split).

Schemas (TRL's standard and conversational formats; a "conversation" is a non-empty list of
``{"role": str, "content": str}``):

* ``sft``: ``text`` (str), or ``messages`` (conversation), or ``prompt`` + ``completion`` (both
  strings or both conversations; the loss is then on the completion only);
* ``dpo``: ``prompt`` + ``chosen`` + ``rejected`` (all strings or all conversations);
* ``kto``: ``prompt`` + ``completion`` + ``label`` (bool: true = desirable). Rows are unpaired.
* ``grpo``: ``prompt`` (string or conversation); every other column (e.g. ``answer``) is kept and
  handed to the reward functions.

Every row must use the same format as row 0. The first bad row is reported by index (0-based; for
JSON Lines also its line number) with what it lacks. Columns a format does not use are dropped.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

from corept.errors import InvalidOptionsError

METHODS = ("sft", "dpo", "kto", "grpo")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
#: method -> list of (format name, required columns), tried in order on each row.
FORMATS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "sft": [("messages", ("messages",)), ("prompt-completion", ("prompt", "completion")), ("text", ("text",))],
    "dpo": [("preference", ("prompt", "chosen", "rejected"))],
    "kto": [("unpaired preference", ("prompt", "completion", "label"))],
    "grpo": [("prompt-only", ("prompt",))],
}
#: methods whose other columns are kept (the reward functions read them)
KEEP_ALL_COLUMNS = ("grpo",)
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


class DataError(InvalidOptionsError):
    """The training data cannot be read or does not match the method's schema."""


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list)) and len(value) == 0)


def _conversation_problem(value: list) -> str | None:
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            return f"message {j} is not a {{'role': str, 'content': str}} object: {str(msg)[:80]!r}"
    return None


def _text_kind(column: str, value: Any) -> tuple[str | None, str | None]:
    """('str' | 'conversation', None) or (None, problem)."""
    if isinstance(value, str):
        return "str", None
    if isinstance(value, list):
        problem = _conversation_problem(value)
        return (None, f"{column!r}: {problem}") if problem else ("conversation", None)
    return None, f"{column!r} must be a string or a list of messages, got {type(value).__name__}"


def parse_label(value: Any) -> bool | None:
    """A KTO label as bool (bools, 0/1, and the strings true/false/yes/no/1/0), else ``None``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    return None


def _row_format(method: str, row: Any) -> tuple[str | None, str | None]:
    """(format name, None) for a valid row, or (None, what is wrong with it)."""
    if not isinstance(row, dict):
        return None, f"is a {type(row).__name__}, not an object with named columns"
    present = sorted(k for k, v in row.items() if not _missing(v))
    for name, cols in FORMATS[method]:
        if not all(not _missing(row.get(c)) for c in cols):
            continue
        kinds = set()
        for c in cols:
            if c == "label":
                if parse_label(row[c]) is None:
                    return None, f"'label' must be a bool (true/false), got {row[c]!r}"
                continue
            kind, problem = _text_kind(c, row[c])
            if problem:
                return None, problem
            kinds.add(kind)
        if len(kinds) > 1:
            return None, f"mixes plain strings and conversations across {list(cols)}; use one kind for all of them"
        return name, None
    needs = " or ".join(" + ".join(repr(c) for c in cols) for _, cols in FORMATS[method])
    closest = max(FORMATS[method], key=lambda f: sum(not _missing(row.get(c)) for c in f[1]))[1]
    lacks = [c for c in closest if _missing(row.get(c))]
    return None, (f"lacks {', '.join(repr(c) for c in lacks)} ({method} rows need {needs}; "
                  f"non-empty columns here: {present or 'none'})")


def check_rows(rows: Iterable[Any], method: str, *, source: str = "data", lines: list[int] | None = None) -> str:
    """Check every row against ``method``'s schema; return the format name of the data.

    :param lines: for JSON Lines, the file line number of each row (named in errors).
    :raises DataError: naming the first bad row (0-based index) and what it lacks.
    """
    if method not in METHODS:
        raise InvalidOptionsError(f"method must be one of {METHODS}, got {method!r}")
    fmt = None
    n = 0
    for i, row in enumerate(rows):
        n += 1
        where = f"row {i}" + (f" (line {lines[i]})" if lines is not None else "")
        name, problem = _row_format(method, row)
        if problem:
            raise DataError(f"{source}: {where} {problem}" if problem.startswith(("lacks", "is a", "mixes"))
                            else f"{source}: {where}: {problem}")
        if fmt is None:
            fmt = name
        elif name != fmt:
            raise DataError(f"{source}: {where} is in {name!r} format but row 0 is in {fmt!r} format; "
                            f"use one format for the whole dataset")
    if n == 0:
        raise DataError(f"{source}: no rows")
    return fmt


# ----------------------------------------------------------------------------- readers


class _Rows(list):
    """A list of rows that remembers the file line of each (JSON Lines)."""

    lines: list[int] | None = None


def _read_jsonl(path: Path) -> list:
    rows, lines = _Rows(), []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {len(rows)} (line {lineno}) is not valid JSON: {exc.msg}") from exc
            lines.append(lineno)
    rows.lines = lines
    return rows


def _read_json(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); for one object per line use "
                        f".jsonl") from exc
    if isinstance(data, dict):
        for key in ("train", "data"):
            if isinstance(data.get(key), list):
                return data[key]
        raise DataError(f"{path}: a JSON object must hold the rows as a list under 'train' or 'data'; "
                        f"it has keys {sorted(data)[:10]}")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def _read_csv(path: Path) -> list:
    with path.open(encoding="utf-8", newline="") as fh:
        return [{k: v for k, v in row.items() if k is not None} for row in csv.DictReader(fh)]


def _read_parquet(path: Path) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_folder(path: Path):
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a datasets folder (save_to_disk) nor a data file: {exc}") from exc
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict has no 'train' split (splits: {sorted(ds)})")
        ds = ds["train"]
    if not isinstance(ds, Dataset):
        raise DataError(f"{path}: unsupported dataset type {type(ds).__name__}")
    return ds


def read_rows(source: str | Path):
    """The rows of ``source``: a list of dicts (files) or a ``datasets.Dataset`` (folders)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected {', '.join(SUFFIXES)} or a datasets folder)")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)} "
                        f"or a datasets folder")
    try:
        return readers[suffix](path)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable file: say which and why
        raise DataError(f"{path}: cannot read {suffix} file: {type(exc).__name__}: {exc}") from exc


def _columns(method: str, fmt: str) -> tuple[str, ...]:
    return dict(FORMATS[method])[fmt]


def load_training_data(source: str | Path, method: str):
    """Read ``source``, check it for ``method`` and return ``(datasets.Dataset, format name)``.

    Only the format's columns are kept (GRPO keeps every column); KTO labels become bools.
    :raises DataError: unreadable source, or the first row that does not fit the schema.
    """
    from datasets import Dataset

    rows = read_rows(source)
    fmt = check_rows(rows, method, source=str(source), lines=getattr(rows, "lines", None))
    cols = _columns(method, fmt)
    if method in KEEP_ALL_COLUMNS:
        return (rows if isinstance(rows, Dataset) else Dataset.from_list(list(rows))), fmt
    if isinstance(rows, Dataset):
        ds = rows.select_columns(list(cols))
        if "label" in cols and ds.features["label"].dtype != "bool":
            ds = ds.map(lambda r: {"label": parse_label(r["label"])})
        return ds, fmt
    clean = [{c: (parse_label(r[c]) if c == "label" else r[c]) for c in cols} for r in rows]
    return Dataset.from_list(clean), fmt

