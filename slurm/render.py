"""Job scripts for the chain train → merge → generate → judge → report, rendered from a resolved recipe.

    from slurm.render import ClusterOptions, render_chain
    scripts = render_chain(recipe, ClusterOptions(nodes=4, gpus_per_node=8, time="2-00:00:00"))
    scripts["train.sbatch"]    # text of RUN_DIR/slurm/train.sbatch

Every value reaches a script in one of two ways: in the shell body it is quoted with shlex.quote, so spaces,
quotes, `$`, backticks and `;` stay literal; in an `#SBATCH` line (read by sbatch, not a shell, and split on
whitespace) it must match a strict pattern or rendering stops with an error naming the option and the value.
The recipe itself never reaches a shell: the stages read it from RUN_DIR/slurm/recipe.yaml.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from launch.process import PREEMPTED_EXIT_CODE

STAGES = ("train", "merge", "generate", "judge", "report")
"""Submission order; each stage waits for the previous one."""

SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "QUIT")
_SBATCH_TOKEN = re.compile(r"^[A-Za-z0-9_.,+:=@/-]+$")
_SBATCH_LINE = re.compile(r"^[A-Za-z0-9_.,+:=@/%-]+$")  # rendered lines may hold Slurm's own %j patterns
# Slurm time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^\d+[KMGT]?$")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")


class RenderError(ValueError):
    """An option or recipe value cannot be rendered safely; the message names it, its value and what is allowed."""


@dataclass
class ClusterOptions:
    """Where and how the chain runs on the cluster (the command-line flags of slurm.submit)."""

    nodes: int = 1
    """Nodes for the training job (one srun task per node, each running torchrun)."""
    gpus_per_node: int = 0
    """GPUs per training node; 0 runs CPU ranks (how the tests run)."""
    procs_per_node: int | None = None
    """Ranks per node; defaults to gpus_per_node, or 1 on CPU."""
    partition: str | None = None
    """Slurm partition (None: the cluster's default)."""
    time: str | None = None
    """Time limit of each job in Slurm's format, e.g. 2-00:00:00 (None: the partition's default)."""
    account: str | None = None
    """Slurm account to charge."""
    cpus_per_task: int | None = None
    """CPUs for each job's task (None: Slurm's default)."""
    mem: str | None = None
    """Memory per node for each job, e.g. 200G or 0 for all (None: Slurm's default)."""
    signal: str = "USR1"
    """Signal Slurm sends to the training batch script before its time limit."""
    signal_seconds: int = 300
    """How long before the time limit that signal comes; the checkpoint must be written within it."""
    rdzv_port: int | None = None
    """Rendezvous port on the first node (None: 20000 + job id mod 20000, so jobs sharing a node differ)."""
    join_timeout_s: int = 900
    """How long torchrun waits for every node to join the rendezvous."""
    max_requeues: int = 20
    """Preemption requeues allowed before the training job gives up (guards against a checkpoint loop)."""
    python: str = sys.executable
    """Python interpreter the jobs run (a path valid on the compute nodes)."""

    @property
    def ranks_per_node(self) -> int:
        if self.procs_per_node is not None:
            return self.procs_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    def validate(self) -> None:
        """Raise RenderError for the first option that is out of range or unsafe."""
        _positive("--nodes", self.nodes)
        if self.gpus_per_node < 0:
            raise RenderError(f"--gpus-per-node = {self.gpus_per_node} must be 0 (CPU ranks) or more")
        if self.procs_per_node is not None:
            _positive("--procs-per-node", self.procs_per_node)
            if self.gpus_per_node > 0 and self.procs_per_node > self.gpus_per_node:
                raise RenderError(f"--procs-per-node = {self.procs_per_node} exceeds --gpus-per-node = "
                                  f"{self.gpus_per_node}: one rank per GPU at most")
        for flag, value in (("--partition", self.partition), ("--account", self.account)):
            if value is not None:
                sbatch_token(flag, value)
        if self.cpus_per_task is not None:
            _positive("--cpus-per-task", self.cpus_per_task)
        if self.mem is not None and not _MEM.match(self.mem):
            raise RenderError(f"--mem = {self.mem!r} is not a Slurm memory size; expected digits with an optional "
                              f"K/M/G/T suffix, e.g. 200G")
        if self.signal not in SIGNALS:
            raise RenderError(f"--signal = {self.signal!r} is not supported; expected one of {list(SIGNALS)}")
        _positive("--signal-seconds", self.signal_seconds)
        if self.time is not None:
            limit = time_limit_seconds(self.time)
            if limit <= self.signal_seconds:
                raise RenderError(f"--time = {self.time!r} ({limit} s) leaves no room for the preemption signal "
                                  f"--signal-seconds = {self.signal_seconds} s before it; raise --time or lower "
                                  f"--signal-seconds")
        if self.rdzv_port is not None and not 1024 <= self.rdzv_port <= 65535:
            raise RenderError(f"--rdzv-port = {self.rdzv_port} must lie in 1024..65535")
        _positive("--join-timeout", self.join_timeout_s)
        if self.max_requeues < 0:
            raise RenderError(f"--max-requeues = {self.max_requeues} must be 0 or more")
        if not Path(self.python).is_absolute():
            raise RenderError(f"--python = {self.python!r} must be an absolute path to an interpreter on the nodes")


def _positive(flag: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RenderError(f"{flag} = {value!r} must be a positive integer")


def sbatch_token(what: str, value: str) -> str:
    """`value` unchanged if sbatch reads it as one literal token in an #SBATCH line, else RenderError."""
    if not _SBATCH_TOKEN.match(value):
        raise RenderError(f"{what} = {value!r} cannot go into an #SBATCH line; use only letters, digits and "
                          f"_ . , + : = @ / - (no spaces, quotes, $, ;, % or backslashes)")
    return value


def time_limit_seconds(text: str) -> int:
    """Seconds in a Slurm time limit string; RenderError naming --time when the format is not Slurm's."""
    match = _TIME.match(text)
    if not match:
        raise RenderError(f"--time = {text!r} is not a Slurm time limit; expected minutes, MM:SS, HH:MM:SS, "
                          f"D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def job_label(name: str, stage: str) -> str:
    """Job name shown by squeue: sspeft-<stage>-<recipe name>, with characters sbatch cannot carry replaced."""
    return f"sspeft-{stage}-{_NAME_UNSAFE.sub('_', name)[:48] or 'run'}"


def judge_needs_gpus(judge: str | None) -> bool:
    """Judges other than an API endpoint run a model on the judge job's own node (local:, serve:, eval's default)."""
    return not (judge or "").startswith("openai:")


def _comment(text: str) -> str:
    # Comments must stay on one line whatever the path holds.
    return re.sub(r"[\x00-\x1f\x7f]", "?", text)


def _sbatch_lines(opts: ClusterOptions, name: str, stage: str, log: str, resources_: dict[str, Any]) -> str:
    lines = [f"--job-name={job_label(name, stage)}", f"--output={log}", "--open-mode=append",
             "--kill-on-invalid-dep=yes"]
    for key, value in resources_.items():
        lines.append(f"--{key}" if value is True else f"--{key}={value}")
    for key, value in (("partition", opts.partition), ("account", opts.account), ("time", opts.time),
                       ("cpus-per-task", opts.cpus_per_task), ("mem", opts.mem)):
        if value is not None:
            lines.append(f"--{key}={value}")
    for line in lines:
        if not _SBATCH_LINE.match(line):
            raise RenderError(f"#SBATCH line {line!r} holds characters sbatch would not read literally")
    return "\n".join(f"#SBATCH {line}" for line in lines)


def _template(name: str) -> str:
    return resources.files("slurm").joinpath("templates", name).read_text(encoding="utf-8")


def _fill(template: str, values: dict[str, str]) -> str:
    text = template
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    leftover = re.findall(r"@@[A-Z_]+@@", text)
    if leftover:
        raise RenderError(f"template fields left unrendered: {sorted(set(leftover))}")
    return text


def _exports(opts: ClusterOptions) -> str:
    lines = []
    if opts.gpus_per_node == 0:
        # CPU ranks: DeepSpeed must not look for a GPU accelerator.
        lines.append("export DS_ACCELERATOR=cpu")
    else:
        # A rank that loses its peers raises instead of hanging in NCCL until the time limit.
        lines.append("export TORCH_NCCL_ASYNC_ERROR_HANDLING=1")
    return "\n".join(lines)


def _gpus(opts: ClusterOptions, count: int) -> dict[str, int]:
    """The gpus-per-node request of a job using `count` GPUs (none when the chain runs CPU ranks)."""
    return {"gpus-per-node": count} if opts.gpus_per_node > 0 else {}


def _stage_script(opts: ClusterOptions, name: str, stage: str, label: str, recipe_comment: str, script: Path,
                  log: str, gpus: dict[str, int], command: str) -> str:
    """A one-node, one-task job (templates/stage_batch.sh) running `command`, logged to `log`; `label` names the
    stage in the script's header comment and first log line, `script` is where the script itself is written."""
    return _fill(_template("stage_batch.sh"), {
        "RECIPE_COMMENT": recipe_comment,
        "STAGE": label,
        "SELF_COMMENT": _comment(str(script)),
        "SBATCH": _sbatch_lines(opts, name, stage, log, {"nodes": 1, "ntasks": 1, **gpus}),
        "EXPORTS": "",
        "COMMAND": command,
    })


def _train_scripts(name: str, run_root: Path, slurm_dir: Path, opts: ClusterOptions, recipe_comment: str,
                   train_module: str) -> dict[str, str]:
    """train.sbatch (the requeueable batch script that forwards the preemption signal) and train_node.sh (the
    torchrun launcher each node's srun task runs)."""
    resources_: dict[str, Any] = {"nodes": opts.nodes, "ntasks-per-node": 1, "requeue": True,
                                  "signal": f"B:{opts.signal}@{opts.signal_seconds}", **_gpus(opts, opts.gpus_per_node)}
    handled = ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"]
    if f"SIG{opts.signal}" not in handled:
        handled.append(f"SIG{opts.signal}")
    return {
        "train.sbatch": _fill(_template("train_batch.sh"), {
            "RECIPE_COMMENT": recipe_comment,
            "SELF_COMMENT": _comment(str(slurm_dir / "train.sbatch")),
            "SBATCH": _sbatch_lines(opts, name, "train", _log(slurm_dir, "train"), resources_),
            "SIGNAL": opts.signal,
            "SIGNAL_SECONDS": str(opts.signal_seconds),
            "RUN_DIR": shlex.quote(str(run_root)),
            "NODE_SCRIPT": shlex.quote(str(slurm_dir / "train_node.sh")),
            "NODES": str(opts.nodes),
            "MAX_REQUEUES": str(opts.max_requeues),
            "PREEMPTED": str(PREEMPTED_EXIT_CODE),
            "RDZV_PORT": str(opts.rdzv_port) if opts.rdzv_port else "$((20000 + SLURM_JOB_ID % 20000))",
            "EXPORTS": _exports(opts),
            "SRUN_CPUS": f"--cpus-per-task={opts.cpus_per_task} " if opts.cpus_per_task else "",
        }),
        "train_node.sh": _fill(_template("train_node.sh"), {
            "NODES": str(opts.nodes),
            "PROCS": str(opts.ranks_per_node),
            "PYTHON": shlex.quote(opts.python),
            "JOIN_TIMEOUT": str(opts.join_timeout_s),
            "HANDLED_SIGNALS": ",".join(handled),
            # torchrun's grace period for the ranks after a forwarded signal: the checkpoint must fit in it.
            "SHUTDOWN_TIMEOUT": str(max(opts.signal_seconds - 30, 10)),
            "COMMAND": shlex.join([opts.python, "-m", train_module, str(slurm_dir / "recipe.yaml")]),
        }),
    }


def _after_training(run_root: str, judge: str | None,
                    opts: ClusterOptions) -> dict[str, tuple[dict[str, int], list[str]]]:
    """{stage: (GPU request, arguments to the interpreter)} for the stages after training, in submission order."""
    return {
        "merge": ({}, ["-m", "launch.merge", run_root]),
        "generate": (_gpus(opts, 1), ["-m", "eval.generate", run_root]),
        "judge": (_gpus(opts, opts.gpus_per_node) if judge_needs_gpus(judge) else {},
                  ["-m", "eval.judge", run_root, *(["--judge", judge] if judge else [])]),
        # The report job also runs when an earlier stage failed: slurm.finish names the failed stage.
        "report": ({}, ["-m", "slurm.finish", run_root]),
    }


def _log(directory: Path, stage: str) -> str:
    return str(directory / "logs" / f"{stage}-%j.out")


def render_chain(recipe: Any, opts: ClusterOptions, recipe_source: str = "",
                 train_module: str = "launch.train") -> dict[str, str]:
    """{file name: script text} for RUN_DIR/slurm/; `recipe` is a resolved launch.recipe.Recipe.

    `train_module` is the module each rank runs with the resolved recipe path (tests put a probe there).
    """
    from launch.rundir import RunDir

    opts.validate()
    run = RunDir(recipe.run_dir)
    sbatch_token("run_dir", str(run.root))
    recipe_comment = _comment(recipe_source or str(run.slurm / "recipe.yaml"))
    scripts = _train_scripts(recipe.name, run.root, run.slurm, opts, recipe_comment, train_module)
    for stage, (gpus, args) in _after_training(str(run.root), recipe.eval.judge, opts).items():
        scripts[f"{stage}.sbatch"] = _stage_script(opts, recipe.name, stage, stage, recipe_comment,
                                                   run.slurm / f"{stage}.sbatch", _log(run.slurm, stage), gpus,
                                                   shlex.join([opts.python, *args]))
    return scripts


def render_sweep_generate(recipes: list[Any], opts: ClusterOptions, sweep_dir: Path, max_rank: int | None = None,
                          max_error: float | None = None) -> str:
    """The one generation job of a sweep: export every run's LoRA (launch.export), then answer for all runs and
    their baselines from one vLLM engine (eval.generate --adapters lora). It runs after every training job."""
    from launch.rundir import RunDir

    opts.validate()
    sbatch_token("sweep dir", str(sweep_dir))
    roots = [str(RunDir(r.run_dir).root) for r in recipes]
    for root in roots:
        sbatch_token("run_dir", root)
    flags = [*(["--max-rank", str(max_rank)] if max_rank is not None else []),
             *(["--max-error", repr(max_error)] if max_error is not None else [])]
    commands = [shlex.join([opts.python, "-m", "launch.export", root, "--to", "lora", *flags]) for root in roots]
    commands.append(shlex.join([opts.python, "-m", "eval.generate", *roots, "--backend", "vllm", "--adapters", "lora"]))
    recipe_comment = _comment(", ".join(str(RunDir(r.run_dir).recipe) for r in recipes))
    return _stage_script(opts, "sweep-" + "+".join(r.name for r in recipes), "generate", "sweep generate",
                         recipe_comment, sweep_dir / "generate.sbatch", _log(sweep_dir, "generate"), _gpus(opts, 1),
                         " && \\\n    ".join(commands))
