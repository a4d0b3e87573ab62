"""launch.train under faults and hostile run directories: directories that are not ours, the run-directory lock,
adapter/context checks against the model before anything is written, cleanup after a failed first start, the
checkpoint-rotation window (a kill between deleting the old checkpoint and marking the new one), the umask, and
a DeepSpeed config that arrives through `accelerate launch`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launch import train as train_stage
from launch.preflight import TrainError, adopt_launcher_deepspeed
from launch.recipe import load_recipe
from launch.rundir import RunDir, RunDirLock, atomic_directory, atomic_file, atomic_write_json, atomic_write_text
from launch_helpers import PYTHON, REPO, child_env, write_recipe


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root with its mode and content digest (directories: mode only)."""
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(root))] = (info.st_mode, info.st_mtime_ns, digest)
    return out


def refused(capsys, recipe: Path, *overrides: str) -> str:
    assert train_stage.main([str(recipe), *overrides]) == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------- directories that are not ours

def test_foreign_directory_is_refused_and_untouched(tmp_path, tiny_llama, capsys):
    model, data = tiny_llama
    foreign = tmp_path / "someone-elses"
    (foreign / "checkpoints" / "checkpoint-7").mkdir(parents=True)
    (foreign / "checkpoints" / "checkpoint-7" / "model.bin").write_bytes(b"weights")
    (foreign / "adapter").mkdir()
    (foreign / "adapter" / "notes.txt").write_text("keep me")
    before = snapshot(foreign)
    err = refused(capsys, write_recipe(tmp_path / "r.yaml", model, data, foreign))
    assert f"run_dir = {str(foreign)!r} already holds files (adapter, checkpoints) but no .run.json marker" in err
    assert snapshot(foreign) == before


@pytest.mark.parametrize("case", ["root", "home", "file", "unreadable-recipe"])
def test_unusable_run_dir_is_refused(tmp_path, tiny_llama, capsys, monkeypatch, case):
    model, data = tiny_llama
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    target, needle = {"root": (Path("/"), "run_dir = '/' is a filesystem root"),
                      "home": (home, f"run_dir = {str(home)!r} is the home directory"),
                      "file": (tmp_path / "a-file", "is a file, not a directory"),
                      "unreadable-recipe": (tmp_path / "run", "holds a recipe.yaml that launch.train cannot read")}[case]
    if case == "file":
        target.write_text("data")
    if case == "unreadable-recipe":
        target.mkdir()
        (target / "recipe.yaml").write_text("model: [unclosed\n")
        atomic_write_json(target / ".run.json", {"made_by": "launch.train", "outputs": {"recipe.yaml": "x"}})
    recipe = write_recipe(tmp_path / "r.yaml", model, data, target)
    before = snapshot(tmp_path)
    assert needle in refused(capsys, recipe)
    assert snapshot(tmp_path) == before
    assert not Path("/.lock").exists()


# ---------------------------------------------------------------- the adapter and data against the model

@pytest.mark.parametrize("method, overrides, needle", [
    ("ssh", ["adapter.n=3000"], "adapter.n=3000 is larger than the 32×64=2048 coefficient positions available "
                                "for module 'model.layers.0.self_attn.v_proj'"),
    ("waveft", ["adapter.target_modules=[nope_proj]"], "adapter.target_modules=['nope_proj'] matched no Linear "
                                                       "layer; the model's Linear layers are named: down_proj"),
    ("shira", ["adapter.target_modules=(q_proj"], "adapter.target_modules = '(q_proj' is not a valid regular "
                                                  "expression"),
    ("lora", ["adapter.target_modules=[nope_proj]"], "nope_proj"),
    ("lora", ["data.max_length=300"], "data.max_length = 300 is larger than the context length of model.path"),
], ids=["n-too-large", "no-target", "bad-pattern", "lora-no-target", "max-length-over-context"])
def test_adapter_and_length_checked_against_model_before_writing(tmp_path, tiny_llama, capsys, method, overrides,
                                                                  needle):
    model, data = tiny_llama
    run = RunDir(tmp_path / "run")
    err = refused(capsys, write_recipe(tmp_path / "r.yaml", model, data, run.root, method=method), *overrides)
    assert needle in err
    if method == "lora" and "nope_proj" in overrides[0]:
        assert "adapter does not fit model.path" in err
    assert not run.root.exists()


def test_failed_first_start_leaves_nothing_and_corrected_rerun_trains(tmp_path, tiny_llama, monkeypatch, caplog):
    model, data = tiny_llama
    run = RunDir(tmp_path / "runs" / "run")
    recipe = write_recipe(tmp_path / "r.yaml", model, data, run.root, method="lora")

    def broken(*_args, **_kwargs):
        assert run.recipe.is_file() and run.template.is_file()  # the failure comes after files were written
        raise RuntimeError("loading failed")

    monkeypatch.setattr(train_stage, "load_causal_lm", broken)
    with pytest.raises(RuntimeError, match="loading failed"):
        train_stage.main([str(recipe), "train.max_steps=1"])
    assert not (tmp_path / "runs").exists()  # created by that start, removed again
    monkeypatch.undo()
    # an attempt killed before its first checkpoint (no cleanup ran) does not block a corrected recipe either
    load_recipe(recipe, ["train.learning_rate=0.5"]).dump(run.recipe)
    (run.logs).mkdir(parents=True)
    (run.checkpoints / "checkpoint-1").mkdir(parents=True)  # killed while saving: no COMPLETE marker
    atomic_write_json(run.marker, {"made_by": "launch.train",
                                   "outputs": dict.fromkeys(["recipe.yaml", "logs", "checkpoints"], "killed")})
    assert train_stage.main([str(recipe), "train.max_steps=1"]) == 0
    assert load_recipe(run.recipe).train.learning_rate == pytest.approx(1e-2)
    assert "never completed a checkpoint; starting over" in caplog.text


# ---------------------------------------------------------------- the lock

HOLDER = textwrap.dedent("""
    import sys, time
    from launch.rundir import RunDirLock
    with RunDirLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


def test_lock_refuses_a_second_process_and_is_released_by_kill_9(tmp_path, tiny_llama, capsys):
    model, data = tiny_llama
    run = RunDir(tmp_path / "run")
    holder = subprocess.Popen([PYTHON, "-c", HOLDER, str(run.root)], cwd=REPO, env=child_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run.root)
        err = refused(capsys, write_recipe(tmp_path / "r.yaml", model, data, run.root, method="lora"))
        assert f"run_dir = {str(run.root)!r} is in use: launch.train (pid {holder.pid} on host " \
               f"{socket.gethostname()}, started " in err
        assert snapshot(run.root) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (run.lock).is_file()  # kill -9 left the file behind, but not the lock
    with RunDirLock(run.root) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not run.lock.exists() and run.is_fresh()


def test_lock_waiter_racing_a_release_locks_the_new_file(tmp_path, monkeypatch):
    """The holder releases (removes the file) between a waiter's open and its flock: the waiter must not end up
    holding the removed file while a third process locks a new one."""
    import launch.rundir

    holder = RunDirLock(tmp_path / "run").acquire()
    real_flock, calls = launch.rundir.fcntl.flock, []

    def flock_after_release(fd, operation):
        if not calls:
            holder.release()
        calls.append(os.fstat(fd).st_ino)
        return real_flock(fd, operation)

    monkeypatch.setattr(launch.rundir.fcntl, "flock", flock_after_release)
    waiter = RunDirLock(tmp_path / "run").acquire()
    monkeypatch.undo()
    assert len(calls) == 2 and waiter.path.stat().st_ino == calls[1]  # it retried on the file now at the path
    with pytest.raises(ValueError, match=f"is in use: launch.train \\(pid {os.getpid()} "):
        RunDirLock(tmp_path / "run").acquire()
    waiter.release()


# ---------------------------------------------------------------- the umask

@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_writers_respect_the_umask(tmp_path, mask, file_mode, dir_mode):
    previous = os.umask(mask)
    try:
        text = atomic_write_text(tmp_path / "a" / "x.txt", "x")
        data = atomic_write_json(tmp_path / "a" / "x.json", {"a": 1})
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "inner.bin").write_bytes(b"1")
            (tmp / "inner.bin").chmod(0o600)  # as safetensors writes its files, whatever the umask
        lock = RunDirLock(tmp_path / "locked").acquire()
        lock_mode = stat.S_IMODE(lock.path.stat().st_mode)
        lock.release()
    finally:
        os.umask(previous)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (text, data, tmp_path / "out" / "inner.bin")}
    assert modes == {p: file_mode for p in modes} and lock_mode == file_mode
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == dir_mode


def test_run_outputs_respect_the_umask(tmp_path, tiny_llama):
    model, data = tiny_llama
    run = RunDir(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", model, data, run.root, method="lora")
    previous = os.umask(0o022)
    try:
        assert train_stage.main([str(recipe), "train.max_steps=1"]) == 0
    finally:
        os.umask(previous)
    wrong = {str(p.relative_to(run.root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in [run.root, *run.root.rglob("*")]
             if stat.S_IMODE(p.stat().st_mode) != (0o755 if p.is_dir() else 0o644)}
    assert not wrong, wrong
    assert (run.adapter / "adapter_model.safetensors").is_file() and run.params.is_file()


# ---------------------------------------------------------------- DeepSpeed through accelerate launch

def test_accelerate_deepspeed_config_is_recorded_or_refused(tmp_path, tiny_llama, monkeypatch, capsys):
    model, data = tiny_llama
    run = RunDir(tmp_path / "run")
    recipe_file = write_recipe(tmp_path / "r.yaml", model, data, run.root)
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launch/ds_zero2.json")  # relative, as accelerate passes it
    recipe = load_recipe(recipe_file)
    adopt_launcher_deepspeed(recipe)
    assert recipe.train.deepspeed == str(REPO / "launch" / "ds_zero2.json")
    contradicting = load_recipe(recipe_file, [f"train.deepspeed={REPO / 'launch' / 'ds_zero3.json'}"])
    with pytest.raises(TrainError, match="but accelerate launch names another DeepSpeed config"):
        adopt_launcher_deepspeed(contradicting)
    err = refused(capsys, recipe_file, f"train.deepspeed={REPO / 'launch' / 'ds_zero3.json'}")
    assert "ds_zero2.json" in err and not run.root.exists()
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    assert "without a deepspeed_config_file while train.deepspeed = null" in refused(capsys, recipe_file)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert "accelerate launch enabled FSDP" in refused(capsys, recipe_file)
    assert not run.root.exists()


# ---------------------------------------------------------------- the rotation window

KILL_AFTER_FIRST_ROTATION = textwrap.dedent("""
    import os, shutil, sys
    real_rmtree = shutil.rmtree

    def rmtree_then_die(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        if os.path.basename(str(path)).startswith("checkpoint-"):
            print(f"killed right after deleting {path}", flush=True)
            os._exit(137)  # no cleanup, no marker: as kill -9 at this instant

    shutil.rmtree = rmtree_then_die
    from launch import train
    sys.exit(train.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_kill_between_rotation_and_marker_keeps_newest_complete_checkpoint(tmp_path, tiny_llama):
    """save_total_limit 1: the process dies at the instant an old checkpoint is deleted. The newest complete
    checkpoint must still be there, the rerun resumes from it, and the summary holds both attempts."""
    model, data = tiny_llama
    run = RunDir(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", model, data, run.root, method="lora",
                          train={"max_steps": 6, "save_steps": 2, "save_total_limit": 1})
    first = subprocess.run([PYTHON, "-c", KILL_AFTER_FIRST_ROTATION, str(recipe)], cwd=REPO, env=child_env(),
                           capture_output=True, text=True, timeout=600)
    log = first.stdout + first.stderr
    assert first.returncode == 137 and "checkpoint-2" in log.split("killed right after deleting")[1], log[-4000:]
    assert [p.name for p in run.complete_checkpoints()] == ["checkpoint-4"], log[-4000:]
    second = subprocess.run([PYTHON, "-m", "launch.train", str(recipe)], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=600)
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-4000:]
    assert f"resuming from {run.checkpoints / 'checkpoint-4'}" in log2
    summary = json.loads((run.logs / train_stage.SUMMARY_FILE).read_text())
    spans = [(a["first_step"], a["last_step"], len(a["step_times_s"])) for a in summary["attempts"]]
    assert spans == [(1, 4, 4), (5, 6, 2)] and len(summary["step_times_s"]) == 6
    assert {e["step"] for e in summary["log"] if "loss" in e} == set(range(1, 7))
    assert [p.name for p in run.complete_checkpoints()] == ["checkpoint-6"]


def test_rotation_keeps_the_newest_complete(tmp_path):
    from launch.callbacks import rotate_checkpoints
    from launch.rundir import COMPLETE_MARKER

    run = RunDir(tmp_path / "run")
    for step, complete in [(2, True), (4, False), (6, True), (8, True), (10, False)]:
        ckpt = run.checkpoints / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        if complete:
            (ckpt / COMPLETE_MARKER).write_text("{}")
    removed = rotate_checkpoints(run, keep=1)
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # an incomplete checkpoint newer than the newest complete one may still be being written: it stays
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-8"]
    assert rotate_checkpoints(run, keep=None) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_atomic_file_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "cache" / "stems.pt"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        tmp.write_bytes(b"v1")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"v1" and sorted(p.name for p in target.parent.iterdir()) == ["stems.pt"]
