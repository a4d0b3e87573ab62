"""The Slurm sweep form: N training jobs rendered as slurm.submit renders them, one generation job after all of
them that exports every run's LoRA and serves them from one engine, per-run judge and report. The rendered
generation job is executed for real (bash) with a probe standing in for Python."""

from __future__ import annotations

import json
import os
import subprocess

import yaml

from slurm.sweep import main as sweep_main
from test_slurm_render import argv_probe, sbatch_options, write_recipe


def two_recipes(tmp_path, **model):
    paths = []
    for name in ("ssh-a", "ssh-b"):
        folder = tmp_path / name
        folder.mkdir()
        path = write_recipe(folder, name=name, run_dir=str(tmp_path / "runs" / name))
        raw = yaml.safe_load(path.read_text())
        raw["model"]["path"] = str(tmp_path / "model")  # one base for the whole sweep
        raw["model"].update(model if name == "ssh-b" else {})
        path.write_text(yaml.safe_dump(raw))
        paths.append(path)
    return paths


def test_dry_run_renders_the_sweep_and_the_generation_job_runs_exports_then_one_engine(tmp_path, monkeypatch,
                                                                                         capsys):
    python, argv_file = argv_probe(tmp_path)
    recipes = two_recipes(tmp_path)
    sweep = tmp_path / "sweep"
    monkeypatch.setenv("PATH", "/nonexistent" + os.pathsep + "/usr/bin" + os.pathsep + "/bin")
    code = sweep_main([str(recipes[0]), str(recipes[1]), "--sweep-dir", str(sweep), "--nodes", "2",
                       "--gpus-per-node", "4", "--max-rank", "64", "--python", python, "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    runs = [tmp_path / "runs" / n for n in ("ssh-a", "ssh-b")]
    for run in runs:
        for name in ("train.sbatch", "train_node.sh", "judge.sbatch", "report.sbatch", "recipe.yaml"):
            assert (run / "slurm" / name).is_file(), (run, name)
        assert not (run / "slurm" / "merge.sbatch").exists() and not (run / "slurm" / "chain.json").exists()
        assert sbatch_options((run / "slurm" / "train.sbatch").read_text())["nodes"] == "2"
    script = (sweep / "generate.sbatch").read_text()
    opts = sbatch_options(script)
    assert opts["gpus-per-node"] == "1" and opts["nodes"] == "1" and opts["kill-on-invalid-dep"] == "yes"
    assert opts["output"] == f"{sweep}/logs/generate-%j.out"
    assert f"--dependency=afterok:<every train job id>' {sweep}/generate.sbatch" in out
    assert out.count("--dependency=afterok:<generate job id>") == 2
    assert out.count("--dependency=afterany:<judge job id>") == 2
    proc = subprocess.run(["bash", str(sweep / "generate.sbatch")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"})
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in argv_file.read_text().splitlines()]
    assert calls == [
        ["-m", "launch.export", str(runs[0]), "--to", "lora", "--max-rank", "64"],
        ["-m", "launch.export", str(runs[1]), "--to", "lora", "--max-rank", "64"],
        ["-m", "eval.generate", str(runs[0]), str(runs[1]), "--backend", "vllm", "--adapters", "lora"],
    ]


def test_a_failed_export_stops_the_generation_job(tmp_path):
    failing = tmp_path / "python-fails"
    failing.write_text("#!/bin/sh\necho \"$@\" >> " + str(tmp_path / "calls") + "\nexit 3\n")
    failing.chmod(0o755)
    recipes = two_recipes(tmp_path)
    assert sweep_main([str(recipes[0]), str(recipes[1]), "--sweep-dir", str(tmp_path / "sweep"), "--nodes", "1",
                       "--gpus-per-node", "0", "--python", str(failing), "--dry-run"]) == 0
    proc = subprocess.run(["bash", str(tmp_path / "sweep" / "generate.sbatch")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"})
    assert proc.returncode == 3
    assert (tmp_path / "calls").read_text().count("\n") == 1  # nothing after the first failure


def test_recipes_on_different_bases_are_refused_before_writing(tmp_path, capsys):
    recipes = two_recipes(tmp_path, quantize="nf4")
    assert sweep_main([str(recipes[0]), str(recipes[1]), "--sweep-dir", str(tmp_path / "sweep"), "--nodes", "1",
                       "--gpus-per-node", "0", "--dry-run"]) == 2
    assert "different bases" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "runs").exists()
