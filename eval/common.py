"""Small pieces every eval stage shares: the error type, JSONL files read with line numbers and written atomically."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from launch.rundir import atomic_write_json, atomic_write_text

__all__ = ["EvalError", "read_jsonl", "write_jsonl", "atomic_write_json", "atomic_write_text", "digest", "safe_id"]


class EvalError(ValueError):
    """Bad input or a failed precondition; the message names the file/field, the value and what was expected."""


def read_jsonl(path: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; a missing file or a non-object line is an EvalError."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{what} file {str(path)!r} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{what} file {path} line {lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise EvalError(f"{what} file {path} line {lineno}: expected a JSON object, got "
                                f"{type(record).__name__}")
            records.append((lineno, record))
    return records


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Rewrite the whole file under a temporary name and rename it: never append, never half-written."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return atomic_write_text(path, text)


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (identifies a judge input or an answer)."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_id(text: str) -> str:
    """A file-name-safe id (model and judge ids become file names in the run directory)."""
    cleaned = _UNSAFE.sub("-", text).strip("-.")
    return cleaned or "model"
