"""Small pieces every eval stage shares: the error type, JSONL files read with line numbers and written atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from launch import process
from launch.process import Terminated
from launch.rundir import atomic_write_json, atomic_write_text

__all__ = ["EvalError", "Terminated", "terminate_on_signals", "read_jsonl", "read_jsonl_lines", "write_jsonl",
           "atomic_write_json", "atomic_write_text", "digest", "safe_id", "check_file_id"]


class EvalError(ValueError):
    """Bad input or a failed precondition; the message names the file/field, the value and what was expected."""


@contextlib.contextmanager
def terminate_on_signals():
    """Turn SIGTERM and SIGHUP into `Terminated` for the length of the block (main thread only); Ctrl-C stays a
    plain KeyboardInterrupt."""
    with process.terminate_on_signals((signal.SIGTERM, signal.SIGHUP)):
        yield


def read_jsonl(path: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; a missing file, bytes that are not UTF-8 or a non-object line
    is an EvalError naming the file and line."""
    return [(lineno, record) for lineno, record, _ in read_jsonl_lines(path, what)]


def read_jsonl_lines(path: Path, what: str, torn_tail_ok: bool = False) -> list[tuple[int, dict[str, Any], bool]]:
    """(line number, record, ends with a newline) per non-blank line. With `torn_tail_ok`, a last line that is not
    valid JSON and lacks its newline (a write cut short by a kill) is dropped instead of being an error."""
    path = Path(path)
    if path.is_dir():
        raise EvalError(f"{what} file {str(path)!r} is a directory; expected a JSONL file")
    if not path.is_file():
        raise EvalError(f"{what} file {str(path)!r} does not exist")
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                # a byte-order mark (Windows editors write one) is not part of the first record
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise EvalError(f"{what} file {path} line {lineno}: byte {raw[e.start]:#04x} (byte {e.start + 1} of "
                                f"the line) is not UTF-8; expected UTF-8 text (convert it, e.g. iconv -f latin1 -t "
                                f"utf-8)") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if torn_tail_ok and not line.endswith("\n") and not f.read(1):
                    break
                raise EvalError(f"{what} file {path} line {lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise EvalError(f"{what} file {path} line {lineno}: expected a JSON object, got "
                                f"{type(record).__name__}")
            records.append((lineno, record, line.endswith("\n")))
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


def check_file_id(flag: str, value: str, names: str) -> str:
    """`value` of the command-line flag `flag`, which names the file `names` (e.g. 'answers/<id>.jsonl'); an
    EvalError when it could leave its folder (a separator, '.' or '..') or is empty. Checked at the command line, so
    a bad id is a clear error before anything is read or written."""
    if not value or "/" in value or "\\" in value or "\0" in value or value in (".", ".."):
        raise EvalError(f"{flag} is {value[:200]!r}; expected a plain file-name component (no '/', '\\', not '.' "
                        f"or '..'): it names {names}, e.g. {safe_id(value)!r}")
    return value
