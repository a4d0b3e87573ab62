"""launch.train, launch.merge and launch.export under hostile input, damaged run directories, full and read-only
file systems and signals. Each failure class has rows in a table (exit status, a message naming the field or file and
what was expected, every file unchanged by content hash) and its reproduction as a test:

1. a stage removes only what it created (a directory is a run only by launch.train's marker);
2. a resume checks what it resumes (data and base fingerprint, every checkpoint file);
3. numbers are range-checked before work, and a run whose adapter did not move or is non-finite fails;
4. YAML alias expansion and quoted values are bounded;
5. OS errors (ENOSPC, EROFS) become messages, temporary outputs go on signals and stale ones are cleared;
6. an empty recipe.yaml and an adapter with duplicate positions are refused early.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import require
from launch import export as export_stage
from launch import merge as merge_stage
from launch import train as train_stage
from launch.recipe import load_recipe
from launch.rundir import RunDir, atomic_write_json, clear_stale_temporaries
from launch_helpers import PYTHON, REPO, child_env, write_recipe, write_records

MESSAGE_LIMIT = 2000
"""No message quoting user input may be longer than this (an alias bomb's repr would be gigabytes)."""


def digests(root: Path) -> dict[str, str | None]:
    """Every entry under root (hidden ones too) with its content hash (directories: None)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def no_model_load(monkeypatch) -> None:
    def fail(*_args, **_kwargs):
        raise AssertionError("the model was loaded although the input is refused before any work")

    monkeypatch.setattr(train_stage, "load_causal_lm", fail)
    monkeypatch.setattr(merge_stage, "load_causal_lm", fail)


# ---------------------------------------------------------------- the table: refused before work, nothing changed

BOMB = "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh"))
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BOMB


def _recipe_file(d: Path, model: Path, data: Path, **sections) -> Path:
    return write_recipe(d / "r.yaml", model, data, d / "run", **sections)


def _text_recipe(text: str):
    def make(d: Path, model: Path, data: Path) -> Path:
        path = d / "r.yaml"
        path.write_text(text.replace("MODEL", str(model)).replace("DATA", str(data)))
        return path
    return make


def _user_dir(d: Path, model: Path, data: Path) -> Path:
    """The user's own recipe.yaml, with `run_dir: .`, in the directory it names."""
    path = write_recipe(d / "work" / "recipe.yaml", model, data, Path("."))
    (d / "work" / "notes.txt").write_text("my notes")
    return path


def _empty_in_run(d: Path, model: Path, data: Path) -> Path:
    (d / "run").mkdir()
    path = d / "run" / "recipe.yaml"
    path.write_bytes(b"")
    atomic_write_json(d / "run" / ".run.json", {"made_by": "launch.train", "outputs": {"recipe.yaml": "x"}})
    return path


def _huge_record(d: Path, model: Path, data: Path) -> Path:
    records = d / "records.json"
    records.write_text(json.dumps([{"instruction": "Count.", "input": "", "output": [1] * 200_000}]))
    return _recipe_file(d, model, records)


TRAIN_ROWS = {
    # class 3: numbers
    "lr-inf": (_recipe_file, ["train.learning_rate=.inf"], "train.learning_rate = inf is not a finite number"),
    "lr-nan": (_recipe_file, ["train.learning_rate=.nan"], "train.learning_rate = nan is not a finite number"),
    "option-inf": (_recipe_file, ["train.adam_beta1=.inf"], "train.adam_beta1 = inf is not a finite number"),
    "seed-negative": (_recipe_file, ["train.seed=-5"], "train.seed = -5 is out of range; expected an integer in "
                                                       "[0, 4294967295]"),
    "seed-huge": (_recipe_file, ["train.seed=99999999999"], "train.seed = 99999999999 is out of range"),
    "eval-fraction": (_recipe_file, ["data.eval_fraction=0.99"],
                      "data.eval_fraction = 0.99 holds out 32 of 32 records, leaving 0 to train on; expected a "
                      "fraction that leaves at least one record on each side"),
    "one-step-all-warmup": (_recipe_file, ["train.max_steps=1", "train.warmup_steps=0.03"],
                            "train.warmup_steps = 0.03 makes the only step of train.max_steps = 1 a warmup step at "
                            "learning rate 0"),
    # class 4: unbounded input
    "bomb-name": (_text_recipe(BOMB + "name: *h\n"), [], "expands to more than 100000 values through YAML aliases"),
    "bomb-report-to": (_text_recipe(BOMB + "train: {report_to: *h}\n"), [], "expands to more than 100000 values"),
    "bomb-override": (_recipe_file, ["name=[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                                     "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                                     "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]"],
                      "expands to more than 100000 values"),
    "recursive-alias": (_text_recipe("name: &r [*r]\n"), [], "a YAML alias refers to a value that contains it"),
    "deep-nesting": (_text_recipe("name: " + "[" * 60 + "]" * 60 + "\n"), [], "nested deeper than 50 levels"),
    "huge-value": (_recipe_file, ["name=[" + ",".join(["'" + "x" * 1000 + "'"] * 1000) + "]"],
                   "name = ['xxxxxxxxx"),
    "huge-record-value": (_huge_record, [], "field 'output' is [1, 1, 1, 1, 1, 1, 1, 1, ...], expected a string"),
    "huge-key": (_recipe_file, ["train." + "k" * 5000 + "=1"], "unknown key in section 'train' 'train.kkkk"),
    # class 1: a directory is a run only by our marker
    "user-recipe-run-dir-dot": (_user_dir, [], "already holds files (notes.txt, recipe.yaml) but no .run.json "
                                               "marker, so launch.train did not make it"),
    # class 6: an empty recipe.yaml
    "empty-recipe-in-run": (_empty_in_run, [], "the file is empty (0 bytes, no YAML document); expected a mapping"),
}


@pytest.mark.parametrize("row", sorted(TRAIN_ROWS))
def test_train_refuses_before_work_and_changes_nothing(tmp_path, tiny_llama, monkeypatch, capsys, row):
    model, data = tiny_llama
    make, overrides, needle = TRAIN_ROWS[row]
    recipe = make(tmp_path, model, data)
    no_model_load(monkeypatch)
    before = digests(tmp_path)
    assert train_stage.main([str(recipe), *overrides]) == 2
    err = capsys.readouterr().err
    assert needle in err, err[:MESSAGE_LIMIT]
    assert len(err) < MESSAGE_LIMIT + 1000
    assert digests(tmp_path) == before


# ---------------------------------------------------------------- a trained run to damage

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> Path:
    """A finished ssh run (checkpoints at steps 1 and 2, adapter) with its own copy of the data."""
    model, data = tiny_llama
    root = tmp_path_factory.mktemp("trained")
    own = write_records(root / "data.json")
    recipe = write_recipe(root / "r.yaml", model, own, root / "run", train={"max_steps": 2, "save_steps": 1,
                                                                            "learning_rate": 0.1})
    assert train_stage.main([str(recipe)]) == 0
    return root


def copy_run(trained: Path, dest: Path, interrupted: bool = True) -> tuple[RunDir, Path]:
    """A copy of the trained run (and its data) under dest whose recipe names the copies; `interrupted` removes the
    finished adapter, as if training had been stopped after its last checkpoint."""
    shutil.copytree(trained, dest, symlinks=True)
    run = RunDir(dest / "run")
    recipe = load_recipe(run.recipe, [f"data.path={dest / 'data.json'}", f"run_dir={run.root}"])
    recipe.dump(run.recipe)
    recipe.dump(dest / "r.yaml")
    if interrupted:
        shutil.rmtree(run.adapter)
        run.params.unlink()
    return run, dest / "r.yaml"


def test_changed_data_contents_refuse_the_resume_naming_them(tmp_path, trained, monkeypatch, capsys):
    run, recipe = copy_run(trained, tmp_path / "c")
    records = json.loads((tmp_path / "c" / "data.json").read_text())
    (tmp_path / "c" / "data.json").write_text(json.dumps(records * 6))  # same path, other contents
    no_model_load(monkeypatch)
    before = digests(tmp_path)
    assert train_stage.main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints trained on other inputs: the records of data.path" in err and "records': 32" in err
    assert "records': 192" in err and "use another run_dir" in err
    assert digests(tmp_path) == before


def test_damaged_newest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, trained, caplog):
    caplog.set_level(logging.INFO)
    run, recipe = copy_run(trained, tmp_path / "c")
    newest = run.checkpoints / "checkpoint-2"
    (newest / "adapter_model.safetensors").unlink()
    assert train_stage.main([str(recipe)]) == 0
    assert f"passing over a damaged checkpoint: {newest / 'adapter_model.safetensors'} is missing" in caplog.text
    assert f"resuming from {run.checkpoints / 'checkpoint-1'}" in caplog.text
    assert (run.adapter / "adapter_config.json").is_file()
    summary = json.loads((run.logs / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["attempts"][-1]["first_step"] == 2


@pytest.mark.parametrize("damage, needle", [
    ("truncate-state", "trainer_state.json is not readable JSON (JSONDecodeError"),
    ("truncate-weights", "adapter_model.safetensors is truncated"),
    ("no-optimizer", "optimizer.pt is missing (no optimizer state to resume)"),
])
def test_no_resumable_checkpoint_is_a_clear_error_naming_the_file(tmp_path, trained, capsys, damage, needle):
    run, recipe = copy_run(trained, tmp_path / "c")
    for ckpt in run.complete_checkpoints():
        if damage == "truncate-state":
            state = ckpt / "trainer_state.json"
            state.write_bytes(state.read_bytes()[:40])
        elif damage == "truncate-weights":
            weights = ckpt / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-100])
        else:
            (ckpt / "optimizer.pt").unlink()
    before = digests(tmp_path)
    assert train_stage.main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint in {run.checkpoints} can be resumed: {run.checkpoints / 'checkpoint-2'}" in err
    assert needle in err and "Traceback" not in err
    assert digests(tmp_path) == before


def test_an_adapter_that_did_not_move_is_no_success(tmp_path, tiny_llama, capsys):
    """Two records, one epoch, batch 2: one step, and the default 3 % warmup makes it a warmup step at lr 0 (the
    recipe alone cannot tell: the step count comes from the data)."""
    model, data = tiny_llama
    recipe = write_recipe(tmp_path / "r.yaml", model, data, tmp_path / "run",
                          train={"max_steps": -1, "num_train_epochs": 1, "warmup_steps": 0.03, "save_steps": 10})
    assert train_stage.main([str(recipe), "data.limit=2"]) == 2
    err = capsys.readouterr().err
    assert "the adapter did not change in 1 steps (every trainable value still at its initial value)" in err
    run = RunDir(tmp_path / "run")
    assert not run.adapter.exists() and not run.params.exists()
    # the trainer's final checkpoint stays (a complete checkpoint is never discarded): a rerun that resumes from it
    # compares with the adapter the first attempt started from, and fails again
    assert run.complete_checkpoints()
    assert train_stage.main([str(recipe), "data.limit=2"]) == 2
    assert "the adapter did not change" in capsys.readouterr().err and not run.adapter.exists()


def test_non_finite_adapter_is_no_success(tmp_path, tiny_llama, capsys, monkeypatch):
    import torch

    model, data = tiny_llama
    recipe = write_recipe(tmp_path / "r.yaml", model, data, tmp_path / "run", train={"max_steps": 1,
                                                                                     "save_steps": 10})
    original = train_stage.check_ranks_agree

    def diverge(model_, timer, zero3):  # what a diverged run leaves: NaN in the trained values
        original(model_, timer, zero3)
        for p in model_.parameters():
            if p.requires_grad:
                with torch.no_grad():
                    p.view(-1)[0] = float("nan")

    monkeypatch.setattr(train_stage, "check_ranks_agree", diverge)
    assert train_stage.main([str(recipe)]) == 2
    assert "the trained adapter holds non-finite values (NaN/inf) in" in capsys.readouterr().err
    run = RunDir(tmp_path / "run")
    assert not run.adapter.exists() and not run.params.exists() and not (run.root / ".adapter.saving").exists()


# ---------------------------------------------------------------- class 1 with a real signal

DRIVER = """
import sys, time
import launch.train as t
original = t.load_causal_lm
def slow(*a, **k):
    print("loading", flush=True)
    time.sleep(3)  # the SIGTERM arrives here, before the first checkpoint
    return original(*a, **k)
t.load_causal_lm = slow
sys.exit(t.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_before_the_first_checkpoint_keeps_everything_it_did_not_create(tmp_path, trained):
    run, recipe = copy_run(trained, tmp_path / "c")
    shutil.rmtree(run.checkpoints)  # merged/ and answers/ of earlier work; retraining without a checkpoint
    (run.root / "merged").mkdir()
    (run.root / "merged" / "model.safetensors").write_bytes(b"weights")
    (run.root / "answers").mkdir()
    (run.root / "answers" / "tuned.jsonl").write_text('{"question_id": 1}\n')
    before = digests(run.root)
    proc = subprocess.Popen([PYTHON, "-c", DRIVER, str(recipe)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        line = ""
        while "loading" not in line and time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "loading" in line, proc.stdout.read()[-4000:] if proc.poll() is not None else "no start"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, out[-4000:]
    after = digests(run.root)
    # logs/ and checkpoints/ were created by the attempt and are gone; template.jinja was rewritten in place
    assert {k: v for k, v in after.items() if k != "template.jinja"} == {
        k: v for k, v in before.items() if k != "template.jinja"}, sorted(set(after) ^ set(before))


# ---------------------------------------------------------------- merge and export: files, file systems, signals

def test_merge_and_export_refuse_bad_run_files_before_work(tmp_path, trained, monkeypatch, capsys):
    """An empty recipe.yaml in a run directory (merge), an adapter with duplicate positions (export)."""
    from safetensors.torch import load_file, save_file

    run, _ = copy_run(trained, tmp_path / "empty", interrupted=False)
    run.recipe.write_bytes(b"")
    dup, _ = copy_run(trained, tmp_path / "dup", interrupted=False)
    weights = dup.adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("sspeft_positions"))
    tensors[key][:, 1] = tensors[key][:, 0]
    save_file(tensors, str(weights))
    no_model_load(monkeypatch)
    before = digests(tmp_path)
    assert merge_stage.main([str(run.root)]) == 2
    assert f"{run.recipe}: the file is empty (0 bytes" in capsys.readouterr().err
    assert export_stage.main([str(dup.root)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and str(weights) in err and "position" in err, err
    assert digests(tmp_path) == before


def test_stale_temporaries_of_dead_writers_are_cleared(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    host = socket.gethostname()
    stale = tmp_path / f".merged.{host}-{dead.pid}.abcd.tmp"
    live = tmp_path / f".merged.{host}-{os.getpid()}.efgh.tmp"
    other_host = tmp_path / f".merged.elsewhere-{dead.pid}.ijkl.tmp"
    for d in (stale, live, other_host):
        (d / "shard").mkdir(parents=True)
    assert clear_stale_temporaries(tmp_path / "merged") == [stale]
    assert not stale.exists() and live.is_dir() and other_host.is_dir()


MERGE_DRIVER = """
import sys, time
import launch.merge as m
original = m.probe
def slow(*a, **k):
    print("writing", flush=True)
    time.sleep(30)  # the SIGTERM arrives while the temporary output exists
    return original(*a, **k)
m.probe = slow
sys.exit(m.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_during_merge_removes_its_temporary_output(tmp_path, trained):
    run, _ = copy_run(trained, tmp_path / "c", interrupted=False)
    stale = run.root / f".merged.{socket.gethostname()}-999999999.dead.tmp"  # an earlier writer killed outright
    stale.mkdir()
    proc = subprocess.Popen([PYTHON, "-c", MERGE_DRIVER, str(run.root)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, line = time.time() + 120, ""
        while "writing" not in line and time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "writing" in line, "merge did not reach the write"
        assert list(run.root.glob(".merged.*.tmp")), "no temporary output while writing"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, out[-4000:]
    assert "stopped by SIGTERM; its temporary output was removed" in out
    assert not list(run.root.glob(".merged.*")) and not run.merged.exists()


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    """A tmpfs of `size` mounted at `where` (root only); always unmounted."""
    require("mounting a tmpfs (root and mount(8))", os.geteuid() == 0 and shutil.which("mount") is not None)
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True, timeout=30)


def _fill(directory: Path, leave: int) -> None:
    free = shutil.disk_usage(directory).free
    with open(directory / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


@pytest.mark.slow
def test_merge_on_a_full_disk_is_a_message_and_leaves_nothing(tmp_path, trained, monkeypatch, capsys):
    with small_tmpfs(tmp_path / "fs", "16m") as fs:
        run, _ = copy_run(trained, fs / "c", interrupted=False)
        _fill(fs, 200 * 1024)  # the model needs ~0.5 MB
        before = digests(fs)
        # the space check refuses before work
        assert merge_stage.main([str(run.root), "--dtype", "fp32"]) == 2
        err = capsys.readouterr().err
        assert "error: the fp32 checkpoint" in err and "its file system has" in err and "free some space" in err
        assert digests(fs) == before
        # past the check (space taken after it), the disk fills while writing: a message, nothing left behind
        monkeypatch.setattr(merge_stage, "check_free_space", lambda *a: None)
        assert merge_stage.main([str(run.root), "--dtype", "fp32"]) == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and "Traceback" not in err, err
        assert digests(fs) == before


@pytest.mark.slow
def test_merge_and_export_on_a_read_only_file_system_refuse_before_work(tmp_path, trained, monkeypatch, capsys):
    with small_tmpfs(tmp_path / "fs", "16m") as fs:
        run, _ = copy_run(trained, fs / "c", interrupted=False)
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True, timeout=30)
        no_model_load(monkeypatch)
        before = digests(fs)
        assert merge_stage.main([str(run.root)]) == 2
        err = capsys.readouterr().err
        assert f"launch.merge: cannot write into {run.root}: EROFS" in err and "read-only" in err
        assert export_stage.main([str(run.root)]) == 2
        err = capsys.readouterr().err
        assert f"launch.export: cannot write into {run.root}: EROFS" in err
        assert digests(fs) == before


# ---------------------------------------------------------------- export adopts the README order's baseline

@pytest.mark.slow
def test_export_adopts_a_per_run_baseline_holding_the_shared_base(tmp_path, tiny_llama, caplog):
    caplog.set_level(logging.INFO)
    model, data = tiny_llama
    recipe = write_recipe(tmp_path / "r.yaml", model, data, tmp_path / "run", quantize="nf4", dtype="fp32",
                          train={"learning_rate": 0.3, "max_steps": 3})
    assert train_stage.main([str(recipe)]) == 0
    run = RunDir(tmp_path / "run")
    assert merge_stage.main([str(run.root), "--no-adapter", "--dtype", "fp32"]) == 0  # the README's order
    written = digests(run.baseline_run().merged)
    assert export_stage.main([str(run.root)]) == 0
    link = run.baseline_run().merged
    assert link.is_symlink() and "adopting" in caplog.text
    assert digests(link.resolve()) == written  # adopted as it was, not written again
    report = json.loads((run.root / "lora" / "export_report.json").read_text())
    assert Path(report["base"]) == link.resolve() and report["probe"]["shift_cosine"] > 0.999
