"""Supervised fine-tuning of a (4-bit) base with a sparse spectral adapter or LoRA, driven by one recipe.

    python -m launch.train recipes/demo/smollm2_ssh.yaml [section.key=value ...]
    deepspeed --num_gpus 2 --module launch.train recipes/alpaca/llama31_8b_ssh.yaml      # ZeRO config from the recipe
    torchrun --nproc_per_node 2 -m launch.train RECIPE.yaml
    accelerate launch --config_file launch/accelerate_zero3.yaml -m launch.train RECIPE.yaml

Everything is checked before anything is written (recipe, data records, base model path, DeepSpeed config, the run
directory, the adapter and data.max_length against the model's config). One process at a time owns a run
directory (a lock naming its holder); a failure before the first complete checkpoint leaves the directory as it
was found. Rerunning the same command resumes from the newest complete checkpoint; a finished run is a no-op. On
SIGTERM or SIGUSR1 all ranks stop after the same step, write a complete checkpoint and exit with status 75 (rerun
to resume). Outputs: see launch/rundir.py.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch import distributed
from launch.data import DataError, Example, build_template, load_records, sft_rows
from launch.models import ModelSpecError, check_model_spec, load_causal_lm, logical_numel, resolve_model_path
from launch.preflight import (TrainError, adopt_launcher_deepspeed, check_against_model, check_fingerprint,
                              check_run_dir, check_split, resume_point, run_fingerprint, zero_stage_of)
from launch.process import PREEMPTED_EXIT_CODE
from launch.recipe import Recipe, RecipeError, load_recipe, shown
from launch.rundir import (COMPLETE_MARKER, Attempt, RunDir, RunDirError, RunDirLock, atomic_directory,
                           atomic_write_json, atomic_write_text, checkpoint_step)
from launch.threads import configure_threads

log = logging.getLogger("launch.train")
SUMMARY_FILE = "train_summary.json"


@dataclass
class Plan:
    """What preflight found: everything the expensive part needs, validated."""

    recipe: Recipe
    run: RunDir
    records: list[Example]
    zero_stage: int | None
    resume_from: Path | None
    finished: bool
    discard: bool = False
    """The directory holds only an attempt of another recipe that never completed a checkpoint: start over."""
    fingerprint: dict | None = None
    """The data, base and DeepSpeed config this run trains on (launch.preflight.run_fingerprint)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    # launchers (deepspeed, older torch.distributed.launch) pass the local rank as an argument
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def adapter_peft_config(recipe: Recipe, checkpoint: Path | None = None):
    """The PEFT config for the recipe's adapter (sspeft's tuner for spectral methods, LoraConfig for lora). Resuming
    from `checkpoint`, a spectral adapter is built from the checkpoint's saved positions and coefficients (nothing is
    chosen again); the recipe was checked against the run's recorded one in preflight."""
    if checkpoint is not None and recipe.adapter.method != "lora":
        from sspeft.peft_tuner import SspeftPeftConfig

        config = SspeftPeftConfig.from_pretrained(str(checkpoint))
        config.inference_mode = False
        return config
    options = dict(recipe.adapter.options)
    if recipe.adapter.method == "lora":
        from peft import LoraConfig

        return LoraConfig(task_type="CAUSAL_LM", **options)
    import sspeft

    options.setdefault("seed", recipe.train.seed)
    return sspeft.peft_config(sspeft.SpectralConfig(method=recipe.adapter.method, **options))


def preflight(recipe: Recipe, run: RunDir) -> Plan:
    """Validate everything cheap, in order, before a single file is written."""
    discard = check_run_dir(recipe, run)
    finished = not discard and _finished(run)
    stage = zero_stage_of(recipe.train.deepspeed)
    if stage == 3 and recipe.model.device_map:
        raise TrainError(f"model.device_map = {shown(recipe.model.device_map)} is incompatible with ZeRO-3 "
                         f"({recipe.train.deepspeed}); set model.device_map to null")
    check_model_spec(recipe.model.path)
    adapter_peft_config(recipe)  # validates every adapter field with the library's own messages
    if not finished:
        check_against_model(recipe, run)
    records = [] if finished else load_records(recipe.data.path, recipe.data.split, recipe.data.limit)
    fingerprint = None
    if not finished:
        check_split(recipe, records)
        fingerprint = run_fingerprint(recipe, records)
        if not discard:
            check_fingerprint(run, fingerprint)
    return Plan(recipe=recipe, run=run, records=records, zero_stage=stage,
                resume_from=None if discard or finished else resume_point(recipe, run), finished=finished,
                discard=discard, fingerprint=fingerprint)


def _finished(run: RunDir) -> bool:
    return run.params.is_file() and (run.adapter / "adapter_config.json").is_file()


def refresh(plan: Plan) -> Plan:
    """Preflight's view of the run directory again, now that this job holds its lock (another process may have
    finished or checkpointed since)."""
    plan.discard = check_run_dir(plan.recipe, plan.run)
    plan.finished = not plan.discard and _finished(plan.run)
    if not plan.finished and not plan.discard:
        check_fingerprint(plan.run, plan.fingerprint or {})
    plan.resume_from = None if plan.discard or plan.finished else resume_point(plan.recipe, plan.run)
    return plan


def sft_config(recipe: Recipe, run: RunDir, dist: distributed.Dist, has_eval: bool):
    """The recipe's train section as TRL's SFTConfig, plus what depends on this machine and launcher."""
    import torch
    from trl import SFTConfig

    from launch.sftconfig import sft_kwargs

    t = recipe.train
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.logs / "tensorboard")
    kwargs = sft_kwargs(t, recipe.data, output_dir=str(run.checkpoints), has_eval=has_eval)
    if t.gradient_checkpointing:
        # PEFT under ZeRO-3 needs reentrant checkpointing (TRL would force it with a warning)
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": zero_stage_of(t.deepspeed) == 3}
    if dist.configured:
        kwargs["accelerator_config"] = {"use_configured_state": True}
    if not torch.cuda.is_available() and not t.deepspeed:
        kwargs["use_cpu"] = True  # (use_cpu silently disables DeepSpeed, so only without it)
    if kwargs["optim"] == "adamw_torch_fused" and not torch.cuda.is_available():
        kwargs["optim"] = "adamw_torch"  # the fused kernel needs a GPU; same update rule
    return SFTConfig(**kwargs)


def prepare_data(plan: Plan, tokenizer):
    from datasets import Dataset

    recipe = plan.recipe
    template = build_template(recipe.data.template, tokenizer)
    rows, dropped = sft_rows(plan.records, tokenizer, template, recipe.data.template,
                             recipe.data.max_length)
    if dropped:
        log.warning("%d of %d records dropped: their prompt alone fills data.max_length=%d", dropped,
                    len(plan.records), recipe.data.max_length)
    dataset = Dataset.from_list(rows)
    eval_dataset = None
    if recipe.data.eval_fraction > 0:
        if len(rows) < 2:
            raise DataError(f"data.eval_fraction = {recipe.data.eval_fraction} needs at least 2 usable records")
        split = dataset.train_test_split(test_size=recipe.data.eval_fraction, seed=recipe.train.seed)
        dataset, eval_dataset = split["train"], split["test"]
    return template, dataset, eval_dataset, dropped


def prepare_base(plan: Plan, dist: distributed.Dist) -> Path:
    """The base as a transformers directory; rank 0 converts a GGUF into base/ while the others wait."""
    error, path = None, None
    if dist.is_main:
        try:
            path = resolve_model_path(plan.recipe.model.path, plan.run.base, plan.recipe.model.revision)
        except ModelSpecError as e:
            error = str(e)
    error = distributed.broadcast_error(error)
    if error:
        raise TrainError(error)
    if not dist.is_main:
        path = resolve_model_path(plan.recipe.model.path, plan.run.base, plan.recipe.model.revision)
    return path


def count_params(model) -> dict[str, int]:
    trainable = total = 0
    for p in model.parameters():
        n = logical_numel(p)  # packed 4-bit weights and ZeRO-3 partitions count what they stand for
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable": trainable, "total": total}


def write_final(trainer, plan: Plan, dist: distributed.Dist, counts: dict, timer, dropped: int) -> None:
    """adapter/ (atomic, non-empty), params.json and logs/train_summary.json."""
    run = plan.run
    tmp = run.root / ".adapter.saving"
    if dist.is_main and tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    distributed.barrier()
    trainer.save_model(str(tmp))  # gathers ZeRO-3 partitions; only rank 0 writes
    distributed.barrier()
    if not dist.is_main:
        return
    # the trainer drops its pickled arguments next to the adapter; adapter/ must never need unpickling
    (tmp / "training_args.bin").unlink(missing_ok=True)
    try:
        _check_not_empty(tmp)
        _check_finite(tmp)
    except TrainError:
        import shutil

        shutil.rmtree(tmp)  # a refused adapter is not kept half-way
        raise
    with atomic_directory(run.adapter) as out:
        for item in tmp.iterdir():
            item.rename(out / item.name)
    tmp.rmdir()
    atomic_write_json(run.logs / SUMMARY_FILE, summary_of(trainer, plan, dist, timer, dropped))
    atomic_write_json(run.params, {"method": plan.recipe.adapter.method, **counts,
                                   "trainable_fraction": counts["trainable"] / max(counts["total"], 1)})


def summary_of(trainer, plan: Plan, dist: distributed.Dist, timer, dropped: int) -> dict:
    """logs/train_summary.json: every attempt (a resumed run has several), and their steps joined."""
    attempts = timer.attempts()
    times = [t for a in attempts for t in a["step_times_s"]]
    steady = [t for a in attempts for t in a["step_times_s"][1:]] or times  # each attempt's first step warms up
    return {"global_step": trainer.state.global_step, "world_size": dist.world_size, "zero_stage": plan.zero_stage,
            "attempts": attempts, "step_times_s": times,
            "mean_step_s": sum(steady) / len(steady) if steady else None,
            "log": [entry for a in attempts for entry in a["log"]], "dropped_records": dropped,
            "wall_s": sum(a["wall_s"] for a in attempts),
            "positions_digests": timer.positions_digests, "weights_digests": timer.weights_digests}


def _check_not_empty(adapter_dir: Path) -> None:
    from safetensors import safe_open

    files = list(adapter_dir.glob("*.safetensors"))
    if not files:
        raise TrainError(f"the trainer saved no adapter weights into {adapter_dir}")
    with safe_open(str(files[0]), "pt") as f:
        empty = [k for k in f.keys() if f.get_slice(k).get_shape() in ([], [0]) or 0 in f.get_slice(k).get_shape()]
        if empty or not list(f.keys()):
            raise TrainError(f"saved adapter tensors are empty ({empty[:3]}); under ZeRO-3 the DeepSpeed config "
                             f"needs stage3_gather_16bit_weights_on_model_save: true")


def _check_finite(adapter_dir: Path) -> None:
    """The saved adapter (gathered, also under ZeRO-3) holds only finite values; a diverged run is no success."""
    from safetensors.torch import load_file

    for file in sorted(adapter_dir.glob("*.safetensors")):
        for key, tensor in load_file(str(file)).items():
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                raise TrainError(f"the trained adapter holds non-finite values (NaN/inf) in {key}: training "
                                 f"diverged; lower train.learning_rate (or raise train.warmup_steps) and rerun in "
                                 f"another run_dir")


INITIAL_ADAPTER = "initial_adapter"
"""Marker key: the digest of the adapter's trainable values before the first step (launch.train.trainable_digests)."""


def record_initial(plan: Plan, dist: distributed.Dist, digest: str | None) -> None:
    """Rank 0 records the untrained adapter's digest in the marker on a fresh start (a resume keeps the first one)."""
    if digest is None or plan.resume_from is not None or not dist.is_main:
        return
    info = plan.run.read_marker() or {"outputs": {}}
    info[INITIAL_ADAPTER] = digest
    plan.run.write_marker(info)


def check_moved(plan: Plan, digest: str | None, steps: int) -> None:
    """A run succeeds only if its adapter moved away from where its first attempt started (else ΔW is its initial
    value, zero for every zero-initialised method: e.g. every step at learning rate 0). Compared across resumes
    through the marker; not under ZeRO-3, where each rank holds only a partition."""
    if digest is None or digest != (plan.run.read_marker() or {}).get(INITIAL_ADAPTER):
        return
    raise TrainError(f"the adapter did not change in {steps} steps (every trainable value still at its initial "
                     f"value): the learning rate was 0 at every step (warmup covering every step?) or no gradient "
                     f"reached it. Check train.learning_rate, train.warmup_steps and train.max_steps, and rerun in "
                     f"another run_dir")


def train(plan: Plan, dist: distributed.Dist, flag: distributed.PreemptionFlag) -> int:
    import torch
    from transformers import AutoTokenizer

    from launch.callbacks import CompleteMarker, PreemptionStop, StepTimer, previous_attempts

    started = time.time()
    recipe, run = plan.recipe, plan.run
    base = prepare_base(plan, dist)
    tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template, dataset, eval_dataset, dropped = prepare_data(plan, tokenizer)
    tokenizer.chat_template = template
    write_run_files(plan, dist, template)
    torch.manual_seed(recipe.train.seed)
    zero3 = plan.zero_stage == 3
    device_map = None if (zero3 or plan.zero_stage is not None) else {"": str(dist.device)}
    model = load_causal_lm(base, recipe.model, zero3=zero3, device_map=device_map)
    if distributed.any_rank(flag.set, dist.device):
        return PREEMPTED_EXIT_CODE  # preempted before the first step: nothing new to save
    resumed_at = int(plan.resume_from.name.rsplit("-", 1)[1]) if plan.resume_from else 0
    timer = StepTimer(previous_attempts(plan.resume_from), resumed_at, dist.world_size, started)
    stop = PreemptionStop(flag, dist)
    callbacks = [CompleteMarker(run, dist, recipe.train.save_total_limit, timer), stop, timer]
    trainer = build_trainer(plan, dist, model, tokenizer, dataset, eval_dataset, callbacks)
    counts = count_params(trainer.model)
    record_initial(plan, dist, None if zero3 else trainable_digests(trainer.model)[0])
    if dist.is_main:
        log.info("trainable parameters: %d of %d (%s)", counts["trainable"], counts["total"],
                 recipe.adapter.method)
        if plan.resume_from:
            log.info("resuming from %s", plan.resume_from)
    trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    if stop.stopped_at is not None:
        if dist.is_main:
            log.warning("preempted (signal %s): checkpoint at step %d written; exiting with %d; rerun to resume",
                        flag.received, stop.stopped_at, PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    check_ranks_agree(trainer.model, timer, zero3)
    check_moved(plan, None if zero3 else trainable_digests(trainer.model)[0], trainer.state.global_step)
    if eval_dataset is not None and not recipe.train.eval_steps:
        trainer.evaluate()  # held-out loss at the end (logged through the callbacks)
    write_final(trainer, plan, dist, counts, timer, dropped)
    if dist.is_main:
        print(f"training finished: adapter in {run.adapter}; next: python -m launch.merge {run.root}")
    return 0


def write_run_files(plan: Plan, dist: distributed.Dist, template: str) -> None:
    """Rank 0 writes recipe.yaml (once) and the chat template, and removes checkpoints a kill left incomplete; every
    rank waits for it."""
    from launch.callbacks import drop_incomplete_checkpoints

    run = plan.run
    if dist.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        if not run.recipe.is_file():
            plan.recipe.dump(run.recipe)
        atomic_write_text(run.template, template)
        # a damaged checkpoint newer than the resume point is about to be rewritten by the trainer: without its
        # marker it is dropped now, so the marker never vouches for a half-rewritten directory
        newer = [p for p in run.complete_checkpoints()
                 if plan.resume_from and checkpoint_step(p) > checkpoint_step(plan.resume_from)]
        for path in newer:
            (path / COMPLETE_MARKER).unlink()
        for path in drop_incomplete_checkpoints(run):
            log.warning("removed incomplete checkpoint %s (killed while saving)", path)
    distributed.barrier()


def build_trainer(plan: Plan, dist: distributed.Dist, model, tokenizer, dataset, eval_dataset, callbacks: list):
    """TRL's SFTTrainer for the recipe's adapter, its adapters kept fp32. Checkpoint rotation is left to the
    CompleteMarker among ``callbacks``."""
    from trl import SFTTrainer

    recipe = plan.recipe
    args = sft_config(recipe, plan.run, dist, has_eval=eval_dataset is not None)
    args.save_total_limit = None  # rotation happens in CompleteMarker, after the new checkpoint is marked complete
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, peft_config=adapter_peft_config(recipe, plan.resume_from),
                         callbacks=callbacks)
    _keep_adapters_fp32(trainer.model)
    return trainer


def check_ranks_agree(model, timer, zero3: bool) -> None:
    """Every rank trained the same adapter: identical positions, and (outside ZeRO-3, where ranks hold different
    partitions) identical trained values; the digests go to the summary through ``timer``."""
    digests = positions_digests(model)
    if len(set(digests)) != 1:
        raise TrainError(f"adapter positions differ between ranks (digests {digests}); every rank must choose "
                         f"them from the same gathered weights")
    timer.positions_digests = digests
    if not zero3:
        weights = trainable_digests(model)
        if len(set(weights)) != 1:
            raise TrainError(f"trained adapter weights differ between ranks (digests {weights}): gradients were "
                             f"not synchronised, so each rank trained its own adapter")
        timer.weights_digests = weights


def positions_digests(model) -> list[str]:
    """A digest of every adapter's positions on each rank, in rank order (identical ranks → identical digests);
    the positions are those the sspeft layers hold (`sspeft.adapter_positions`; LoRA has none)."""
    import sspeft

    return _all_ranks(_digest(sspeft.adapter_positions(model).items(), lambda t: t.long()))


def trainable_digests(model) -> list[str]:
    """A digest of every trainable parameter's values on each rank, in rank order (data parallel → identical)."""
    trainable = ((name, p) for name, p in model.named_parameters() if p.requires_grad)
    return _all_ranks(_digest(trainable, lambda t: t.float().contiguous()))


def _digest(named_tensors, as_stored) -> str:
    """A 16-hex-digit digest of (name, tensor) pairs, in name order, each tensor first mapped by `as_stored`."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(as_stored(tensor.detach().cpu()).numpy().tobytes())
    return digest.hexdigest()[:16]


def _all_ranks(mine: str) -> list[str]:
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def _keep_adapters_fp32(model) -> None:
    """Undo TRL's cast of trainable parameters of 4-bit models to bf16 (tiny updates to them would vanish): sspeft
    coefficients get their exact fp32 values back (`sspeft.restore_fp32`); any trainable parameter still not fp32
    (LoRA's) is upcast. Parameters DeepSpeed manages are left to its engine (a ZeRO-3 parameter holds only its
    partition locally; the engine keeps its own fp32 master copy)."""
    import torch

    import sspeft
    from sspeft.layer import deepspeed_owns

    sspeft.restore_fp32(model)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32 and not deepspeed_owns(p):
            p.data = p.data.float()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    flag = distributed.PreemptionFlag()
    previous = flag.install()  # before anything slow, so an early signal is not fatal
    try:
        return _main(args, flag)
    finally:
        flag.restore(previous)


def _main(args: argparse.Namespace, flag: distributed.PreemptionFlag) -> int:
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        log.info("CPU threads: %s", configure_threads())
        adopt_launcher_deepspeed(recipe)
        run = recipe.run
        plan = preflight(recipe, run)
    except (RecipeError, DataError, ModelSpecError, TrainError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if plan.finished:
        print(f"{run.root} already holds a finished run (adapter/ and params.json); nothing to do")
        return 0
    dist = distributed.init(deepspeed=bool(recipe.train.deepspeed))
    try:
        with owned(run, dist):
            plan = refresh(plan)
            distributed.barrier()  # every rank has read the directory before rank 0 writes into it
            if plan.finished:
                print(f"{run.root} already holds a finished run (adapter/ and params.json); nothing to do")
                return 0
            return train_or_clean(plan, dist, flag)
    except (DataError, ModelSpecError, TrainError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def owned(run: RunDir, dist: distributed.Dist):
    """Hold the run directory's lock (rank 0 takes it for the whole job); every rank fails if it is taken. A run
    directory this job created is removed again if it is left empty."""
    lock, error, created = None, None, _first_missing(run.root)
    if dist.is_main:
        try:
            lock = RunDirLock(run.root).acquire()
        except (RunDirError, OSError) as e:
            error = str(e)
    error = distributed.broadcast_error(error)
    if error:
        raise TrainError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
            _remove_if_empty(run.root, created)


def _first_missing(path: Path) -> Path | None:
    """The outermost directory that does not exist yet on the way to `path` (None if `path` exists)."""
    missing = None
    for candidate in [path, *path.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


def _remove_if_empty(root: Path, created: Path | None) -> None:
    if created is None:
        return
    for directory in [root, *root.parents]:
        try:
            directory.rmdir()  # only succeeds while empty
        except OSError:
            return
        if directory == created:
            return


def train_or_clean(plan: Plan, dist: distributed.Dist, flag: distributed.PreemptionFlag) -> int:
    """Train; a failure (or stop) before the first complete checkpoint removes what this attempt created (recorded
    in the run directory's marker before it was written) and nothing else, so the corrected rerun starts from the
    directory as it was found."""
    run = plan.run
    attempt = Attempt(run)
    if dist.is_main:
        if plan.discard:
            log.warning("%s holds only an attempt of another recipe that never completed a checkpoint; starting "
                        "over (removing %s)", run.root, ", ".join(run.discard_recorded_outputs()) or "nothing")
        attempt.claim(plan.fingerprint)
    distributed.barrier()
    code = 1
    try:
        code = train(plan, dist, flag)
        return code
    finally:
        if code != 0 and dist.is_main and not run.complete_checkpoints() and not run.adapter.exists():
            attempt.undo()


if __name__ == "__main__":
    sys.exit(main())
