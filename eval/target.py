"""What a TARGET on the eval command lines means: a run directory or a model path, and the defaults it brings.

A run directory (launch/rundir.py) supplies its merged model, its recorded chat template, the recipe's `eval`
section as defaults, and the answers/ and judgments/ folders. `RUN/baseline` is a run directory too; it takes its
defaults and template from the run around it. Anything else is a model path (a transformers directory, a .gguf
file, `smollm2`) and needs `--out DIR`, which is then used like a run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from eval.common import EvalError, check_file_id, safe_id
from launch.recipe import EvalSection
from launch.rundir import MERGE_REPORT, RunDir


@dataclass
class Target:
    """A resolved TARGET."""

    out: RunDir
    """Where answers/, judgments/ and reports go."""
    model_id: str
    """Name of the evaluated model (answers/<model_id>.jsonl)."""
    model_spec: Optional[str] = None
    """A model path given directly (not a run directory)."""
    run: Optional[RunDir] = None
    """The run directory, when TARGET is one."""
    template: Optional[Path] = None
    """The chat template file to generate through (template.jinja), if the run recorded one."""
    defaults: EvalSection = field(default_factory=EvalSection)
    """Flag defaults: the run's recipe `eval` section, else the built-in ones."""
    base_model: Optional[tuple[str, Path]] = None
    """(the recipe's model.path, the run's base/ folder): where training already converted that model."""


def _is_baseline(path: Path) -> bool:
    return path.name == "baseline" and (path.parent / "recipe.yaml").is_file()


def _looks_like_model(spec: str) -> bool:
    path = Path(spec).expanduser()
    if spec == "smollm2" or path.suffix == ".gguf":
        return True
    return path.is_dir() and (path / "config.json").is_file() and not _is_baseline(path)


def resolve_target(target: str, out: Optional[str], model_id: Optional[str]) -> Target:
    """Classify TARGET; a model path without --out, or a path that does not exist, is an error."""
    if model_id is not None:
        check_file_id("--model-id", model_id, "answers/<model_id>.jsonl")
    if _looks_like_model(target):
        if out is None:
            raise EvalError(f"TARGET {target!r} is a model, not a run directory: give --out DIR for the answers, "
                            f"judgments and report")
        name = model_id or safe_id(Path(target).name.removesuffix(".gguf"))
        return Target(RunDir(out), name, model_spec=target)
    path = Path(target).expanduser()
    if not path.is_dir():
        raise EvalError(f"TARGET {target!r} does not exist; expected a run directory (made by python -m "
                        f"launch.train) or a model (a transformers directory, a .gguf file, smollm2)")
    run = RunDir(path)
    outer = RunDir(path.parent) if _is_baseline(path) else run
    recipe = _load_recipe(outer) if outer.recipe.is_file() else None
    name = model_id or _run_model_id(run, outer, recipe.name if recipe else None)
    template = next((t.template for t in (run, outer) if t.template.is_file()), None)
    return Target(RunDir(out) if out else run, name, run=run, template=template,
                  defaults=recipe.eval if recipe else EvalSection(),
                  base_model=(recipe.model.path, outer.base) if recipe else None)


def _run_model_id(run: RunDir, outer: RunDir, recipe_name: Optional[str]) -> str:
    if recipe_name is None:
        # an --out folder of a model path: its one answers file names the model
        found = sorted(run.answers.glob("*.jsonl")) if run.answers.is_dir() else []
        if len(found) == 1:
            return found[0].stem
    base = recipe_name or outer.root.name
    return safe_id(f"{base}-baseline" if run != outer else base)


def _load_recipe(run: RunDir) -> Any:
    from launch.recipe import RecipeError, load_resolved

    try:
        return load_resolved(run.root)
    except RecipeError as e:
        raise EvalError(f"cannot read the run's recipe: {e}") from e


def model_dir_of(target: Target, work_dir: Path) -> Path:
    """The weights to generate with: the run's merged/ (or baseline's), or the given model path resolved."""
    from launch.models import ModelSpecError, resolve_model_path

    if target.run is None:
        try:
            return resolve_model_path(target.model_spec, work_dir)  # type: ignore[arg-type]
        except ModelSpecError as e:
            raise EvalError(str(e)) from e
    run = target.run
    for candidate in (run.merged, run.root):
        if (candidate / "config.json").is_file():
            return candidate
    if run.root.name == "baseline":
        command = f"python -m launch.merge {run.root.parent} --no-adapter"
    else:
        command = f"python -m launch.merge {run.root}"
    raise EvalError(f"run directory {run.root} has no merged weights ({run.merged} is missing); make them with "
                    f"`{command}`")


def resolve_judge_model(spec: str, target: Optional[Target] = None) -> Path:
    """The judge's checkpoint; a judge that is the run's own base model reuses training's conversion in base/."""
    from launch.models import ModelSpecError, resolve_model_path, shared_cache

    work_dir = shared_cache()
    if target is not None and target.base_model is not None and target.base_model[0] == spec:
        work_dir = target.base_model[1]
    try:
        return resolve_model_path(spec, work_dir)
    except ModelSpecError as e:
        raise EvalError(f"judge model: {e}") from e


def read_merge_report(model_dir: Path) -> Optional[dict[str, Any]]:
    """merge_report.json beside a merged checkpoint, or None for a checkpoint launch.merge did not write."""
    path = Path(model_dir) / MERGE_REPORT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise EvalError(f"{path} is not valid JSON ({e}); merge again with python -m launch.merge") from e


def check_merge_report(model_dir: Path, dtype: str, allow_lossy: bool) -> None:
    """Refuse a checkpoint that is not the trained model: launch.merge marked it lossy, or `dtype` would round it
    to a dtype the merge measured as losing ΔW. Judge scores of it would be about another model."""
    report = read_merge_report(model_dir)
    if allow_lossy or report is None:
        return
    if report.get("lossy"):
        probe = report.get("probe") or {}
        raise EvalError(f"{model_dir} is marked lossy by launch.merge (--allow-lossy): rounding to "
                        f"{report.get('dtype')} lost {share_text(report.get('delta_lost_worst_layer'))} of the worst "
                        f"layer's ΔW, logit-shift cosine {probe.get('cosine')} and residual {probe.get('residual')}; "
                        f"merge again with --dtype auto, or pass --allow-lossy to evaluate it anyway")
    worst = ((report.get("delta_loss") or {}).get(dtype) or {}).get("worst", 0.0) if dtype != "auto" else 0.0
    if worst is None or worst > report.get("max_delta_loss", 1.0):
        raise EvalError(f"--dtype {dtype} rounds {model_dir} (stored as {report.get('dtype')}) so that "
                        f"{share_text(worst)} of the worst layer's ΔW is lost; use --dtype auto, "
                        f"or pass --allow-lossy")


def share_text(x: Optional[float]) -> str:
    """A lost share of ΔW as a percentage for messages ("all (overflow)" when it is not finite)."""
    return "all (overflow)" if x is None else f"{100 * x:.2f}%"
