"""Supervised fine-tuning of a (4-bit) base with a sparse spectral adapter or LoRA, driven by one recipe.

    python -m launch.train recipes/demo/smollm2_ssh.yaml [section.key=value ...]
    deepspeed --num_gpus 2 --module launch.train recipes/alpaca/llama31_8b_ssh.yaml      # ZeRO config from the recipe
    torchrun --nproc_per_node 2 -m launch.train RECIPE.yaml
    accelerate launch --config_file launch/accelerate_zero3.yaml -m launch.train RECIPE.yaml

Everything is checked before anything is written (recipe, data records, base model path, DeepSpeed config, the run
directory's own recipe). Rerunning the same command resumes from the newest complete checkpoint; a finished run
is a no-op. On SIGTERM or SIGUSR1 all ranks stop after the same step, write a complete checkpoint and exit with
status 75 (rerun to resume). Outputs: see launch/rundir.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch import distributed
from launch.data import DataError, Example, build_template, load_records, sft_rows
from launch.models import ModelSpecError, check_model_spec, load_causal_lm, resolve_model_path
from launch.recipe import Recipe, RecipeError, load_recipe, load_resolved
from launch.rundir import RunDir, atomic_directory, atomic_write_json, atomic_write_text

log = logging.getLogger("launch.train")
SUMMARY_FILE = "train_summary.json"


class TrainError(RuntimeError):
    """The training stage cannot start; the message says what to change."""


@dataclass
class Plan:
    """What preflight found: everything the expensive part needs, validated."""

    recipe: Recipe
    run: RunDir
    records: list[Example]
    zero_stage: int | None
    resume_from: Path | None
    finished: bool


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


def zero_stage_of(path: str | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config file (None without DeepSpeed)."""
    if not path:
        return None
    file = Path(path)
    if not file.is_file():
        raise TrainError(f"train.deepspeed = {path!r} does not exist; use one of launch/ds_zero2.json, "
                         f"launch/ds_zero3.json or null")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"train.deepspeed = {path!r} is not valid JSON: {e}") from e
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise TrainError(f"{path}: zero_optimization.stage = {stage!r}; expected 0, 1, 2 or 3")
    return int(stage)


def adapter_peft_config(recipe: Recipe):
    """The PEFT config for the recipe's adapter (sspeft's tuner for spectral methods, LoraConfig for lora)."""
    options = dict(recipe.adapter.options)
    if recipe.adapter.method == "lora":
        from peft import LoraConfig

        return LoraConfig(task_type="CAUSAL_LM", **options)
    import sspeft

    options.setdefault("seed", recipe.train.seed)
    return sspeft.peft_config(sspeft.SpectralConfig(method=recipe.adapter.method, **options))


def preflight(recipe: Recipe, run: RunDir) -> Plan:
    """Validate everything cheap, in order, before a single file is written."""
    if recipe.run_dir and run.recipe.is_file():
        previous = load_resolved(run.root)
        changed = recipe.differences(previous)
        if changed:
            old, new = previous.flat(), recipe.flat()
            details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise TrainError(f"{run.root} was made by a different recipe ({details}). Use another run_dir, or "
                             f"remove the directory to start over")
    if recipe.train.resume == "never" and not run.is_fresh():
        raise TrainError(f"train.resume = 'never' but {run.root} is not empty")
    finished = run.params.is_file() and (run.adapter / "adapter_config.json").is_file()
    stage = zero_stage_of(recipe.train.deepspeed)
    if stage == 3 and recipe.model.device_map:
        raise TrainError(f"model.device_map = {recipe.model.device_map!r} is incompatible with ZeRO-3 "
                         f"({recipe.train.deepspeed}); set model.device_map to null")
    check_model_spec(recipe.model.path)
    records = [] if finished else load_records(recipe.data.path, recipe.data.split, recipe.data.limit)
    adapter_peft_config(recipe)  # validates every adapter field with the library's own messages
    complete = run.complete_checkpoints()
    return Plan(recipe=recipe, run=run, records=records, zero_stage=stage,
                resume_from=complete[-1] if complete and recipe.train.resume == "auto" else None,
                finished=finished)


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
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty local tensor
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable": trainable, "total": total}


def write_final(trainer, plan: Plan, dist: distributed.Dist, counts: dict, timer, dropped: int,
                started: float) -> None:
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
    _check_not_empty(tmp)
    with atomic_directory(run.adapter) as out:
        for item in tmp.iterdir():
            item.rename(out / item.name)
    tmp.rmdir()
    times = timer.step_times
    steady = times[1:] if len(times) > 1 else times
    summary = {"global_step": trainer.state.global_step, "world_size": dist.world_size,
               "zero_stage": plan.zero_stage, "step_times_s": times,
               "mean_step_s": sum(steady) / len(steady) if steady else None, "log": timer.losses,
               "dropped_records": dropped, "wall_s": time.time() - started,
               "positions_digests": timer.positions_digests, "weights_digests": timer.weights_digests}
    atomic_write_json(run.logs / SUMMARY_FILE, summary)
    atomic_write_json(run.params, {"method": plan.recipe.adapter.method, **counts,
                                   "trainable_fraction": counts["trainable"] / max(counts["total"], 1)})


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


def train(plan: Plan, dist: distributed.Dist, flag: distributed.PreemptionFlag) -> int:
    import torch
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from launch.callbacks import CompleteMarker, PreemptionStop, StepTimer, drop_incomplete_checkpoints

    started = time.time()
    recipe, run = plan.recipe, plan.run
    was_fresh = run.is_fresh()
    try:
        base = prepare_base(plan, dist)
        tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=recipe.model.trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        template, dataset, eval_dataset, dropped = prepare_data(plan, tokenizer)
    except BaseException:
        if dist.is_main and was_fresh:
            _clean_fresh(run)  # a failed first start leaves the directory as it found it
        raise
    tokenizer.chat_template = template
    if dist.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        if not run.recipe.is_file():
            recipe.dump(run.recipe)
        atomic_write_text(run.template, template)
        for path in drop_incomplete_checkpoints(run):
            log.warning("removed incomplete checkpoint %s (killed while saving)", path)
    distributed.barrier()
    torch.manual_seed(recipe.train.seed)
    zero3 = plan.zero_stage == 3
    device_map = None if (zero3 or plan.zero_stage is not None) else {"": str(dist.device)}
    model = load_causal_lm(base, recipe.model, zero3=zero3, device_map=device_map)
    if distributed.any_rank(flag.set, dist.device):
        return distributed.PREEMPTED_EXIT_CODE  # preempted before the first step: nothing new to save
    args = sft_config(recipe, run, dist, has_eval=eval_dataset is not None)
    timer, stop = StepTimer(), PreemptionStop(flag, dist)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, peft_config=adapter_peft_config(recipe),
                         callbacks=[CompleteMarker(run, dist), stop, timer])
    _keep_adapters_fp32(trainer.model)
    counts = count_params(trainer.model)
    if dist.is_main:
        log.info("trainable parameters: %d of %d (%s)", counts["trainable"], counts["total"],
                 recipe.adapter.method)
        if plan.resume_from:
            log.info("resuming from %s", plan.resume_from)
    trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    if stop.stopped_at is not None:
        if dist.is_main:
            log.warning("preempted (signal %s): checkpoint at step %d written; exiting with %d; rerun to resume",
                        flag.received, stop.stopped_at, distributed.PREEMPTED_EXIT_CODE)
        return distributed.PREEMPTED_EXIT_CODE
    digests = positions_digests(trainer.model)
    if len(set(digests)) != 1:
        raise TrainError(f"adapter positions differ between ranks (digests {digests}); every rank must choose "
                         f"them from the same gathered weights")
    timer.positions_digests = digests
    if not zero3:  # ZeRO-3 ranks hold different partitions; everywhere else the trained values must be replicas
        weights = trainable_digests(trainer.model)
        if len(set(weights)) != 1:
            raise TrainError(f"trained adapter weights differ between ranks (digests {weights}): gradients were "
                             f"not synchronised, so each rank trained its own adapter")
        timer.weights_digests = weights
    if eval_dataset is not None and not recipe.train.eval_steps:
        trainer.evaluate()  # held-out loss at the end (logged through the callbacks)
    write_final(trainer, plan, dist, counts, timer, dropped, started)
    if dist.is_main:
        print(f"training finished: adapter in {run.adapter}; next: python -m launch.merge {run.root}")
    return 0


def positions_digests(model) -> list[str]:
    """A digest of every adapter's positions on each rank, in rank order (identical ranks → identical digests)."""
    import hashlib

    digest = hashlib.sha256()
    for name, buffer in sorted(model.named_buffers()):
        if "positions" in name:  # sspeft_positions buffers; LoRA has none
            digest.update(name.encode())
            digest.update(buffer.detach().cpu().long().numpy().tobytes())
    return _all_ranks(digest.hexdigest()[:16])


def trainable_digests(model) -> list[str]:
    """A digest of every trainable parameter's values on each rank, in rank order (data parallel → identical)."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return _all_ranks(digest.hexdigest()[:16])


def _all_ranks(mine: str) -> list[str]:
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def _clean_fresh(run: RunDir) -> None:
    import shutil

    if run.root.is_dir():
        for item in run.root.iterdir():
            if item.name != "slurm":
                shutil.rmtree(item) if item.is_dir() else item.unlink()


def _keep_adapters_fp32(model) -> None:
    """TRL casts trainable parameters of 4-bit models to bf16; tiny updates to coefficients then vanish."""
    import torch

    import sspeft

    sspeft.restore_fp32(model)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
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
        return train(plan, dist, flag)
    except (DataError, ModelSpecError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
