"""Shared test setup.

One temporary HF_HOME and TORCH_EXTENSIONS_DIR serve the whole pytest run (DeepSpeed's op build then happens once,
and nothing leaks into the user's caches); the hub is offline. Real-component tests use `require()`: without CI a
missing component skips, with CI=true it fails.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="sspeft-tests-"))
os.environ["HF_HOME"] = str(_SESSION_TMP / "hf_home")
os.environ["TORCH_EXTENSIONS_DIR"] = str(_SESSION_TMP / "torch_extensions")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
# the MT-Bench and Alpaca sample files sit next to the checkout; SSPEFT_SHARED_DIR points elsewhere
SHARED = Path(os.environ.get("SSPEFT_SHARED_DIR", REPO.parent / "shared"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(what: str, available: bool, why: str = "") -> None:
    """Skip when a real component is missing on a developer machine; fail under CI=true."""
    if available:
        return
    msg = f"{what} is not available{': ' + why if why else ''}"
    if in_ci():
        pytest.fail(f"CI=true and {msg}")
    pytest.skip(msg)


def require_module(name: str) -> None:
    require(f"python module {name!r}", importlib.util.find_spec(name) is not None)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    require(f"program {name!r}", path is not None)
    return path  # type: ignore[return-value]


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def tiny_llama(session_tmp) -> tuple[Path, Path]:
    """(model directory, Alpaca records file): the tiny random LLaMA and records of tests/launch_helpers.py, built
    once per test session."""
    from launch_helpers import build_tiny_llama, write_records

    model = session_tmp / "tiny-llama"
    if not (model / "config.json").is_file():
        build_tiny_llama(model)
    return model, write_records(session_tmp / "tiny-data" / "alpaca.json")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    require("the shared data directory (../shared or $SSPEFT_SHARED_DIR)", SHARED.is_dir(), str(SHARED))
    return SHARED


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
