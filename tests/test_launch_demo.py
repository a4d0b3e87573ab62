"""launch.demo's timing record: a model conversion is told apart from a run that reuses the shared cache."""

from __future__ import annotations

import os

from launch.demo import conversion_markers
from launch.models import SOURCE_FILE
from launch.rundir import RunDir


def test_a_hard_linked_cache_copy_is_not_a_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("SSPEFT_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "models" / "model-a"
    cached.mkdir(parents=True)
    (cached / SOURCE_FILE).write_text("{}")
    run = RunDir(tmp_path / "run")
    before = conversion_markers(run)
    (run.base / "model-a").mkdir(parents=True)
    os.link(cached / SOURCE_FILE, run.base / "model-a" / SOURCE_FILE)  # what convert_gguf does with the cache
    assert set(conversion_markers(run)) == set(before)
    fresh = tmp_path / "cache" / "models" / "model-b"
    fresh.mkdir()
    (fresh / SOURCE_FILE).write_text("{}")  # a conversion
    after = conversion_markers(run)
    assert [p for k, p in after.items() if k not in before] == [str(fresh / SOURCE_FILE)]
