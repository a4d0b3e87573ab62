"""benchmarks/adapter_speed.py end to end at its smoke size: every method it times trains a step, its trainable
counts are the adapters', and each sspeft method records the execution path it took."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_times_every_method_and_records_their_paths(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "benchmarks/adapter_speed.py", "--quick", "--checkpointing", "off", "--layers", "1",
           "--threads", "1", "--n", "64", "--methods", "lora-r8,ssh,waveft", "--json", str(out),
           "--markdown", str(tmp_path / "speed.md")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (table,) = json.loads(out.read_text())["tables"]
    assert table["failures"] in ({}, [], None), table["failures"]
    rows = table["rows"]
    assert set(rows) == {"lora-r8", "ssh", "waveft"}
    hidden = 2048  # the "bench" shape: one layer, q_proj and v_proj both 2048×2048
    assert rows["lora-r8"]["trainable"] == 2 * 8 * (hidden + hidden)
    assert rows["ssh"]["trainable"] == rows["waveft"]["trainable"] == 2 * 64
    assert rows["lora-r8"]["ratio"] == 1.0 and all(r["median_s"] > 0 for r in rows.values())
    assert rows["ssh"]["paths"] in ("merged", "split", "factorized") and rows["waveft"]["paths"] in ("merged", "split")
