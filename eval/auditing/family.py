"""Self-preference: judges tend to favour answers written by themselves or by models of their family (the MT-Bench
paper's self-enhancement bias). The audit warns when the judge and the judged model share a base or a family,
read from what each names: the judge spec, the recipe's base model, and the config.json of each checkpoint found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from eval.judging.spec import JudgeSpec
from eval.target import Target

FAMILIES = ("llama", "qwen", "mistral", "mixtral", "gemma", "phi", "smollm", "gpt", "claude", "deepseek", "falcon",
            "olmo", "granite")
"""Family names looked for in model names and paths (lower case)."""


def _config(folder: Optional[Path]) -> dict[str, Any]:
    path = folder / "config.json" if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def _families(*names: Optional[str]) -> set[str]:
    text = " ".join(n.lower() for n in names if n)
    return {f for f in FAMILIES if f in text}


def _judged(target: Target) -> tuple[list[str], dict[str, Any]]:
    """The judged model's names (recipe base, checkpoint paths) and its checkpoint's config."""
    names = [target.model_id, target.model_spec]
    folders: list[Path] = []
    if target.base_model is not None:
        names.append(target.base_model[0])
        folders.append(target.base_model[1])
    if target.run is not None:
        folders += [target.run.merged, target.run.root]
    if target.model_spec and Path(target.model_spec).expanduser().is_dir():
        folders.append(Path(target.model_spec).expanduser())
    config = next((c for c in map(_config, folders) if c), {})
    return [n for n in names if n] + [config.get("_name_or_path", "")], config


def self_preference(spec: JudgeSpec, target: Target) -> dict[str, Any]:
    """{warning, reasons, judge_families, model_families}: whether the judge and the judged model share a base
    (the same model name or path) or a family (a family name in both, or the same config model_type)."""
    names, config = _judged(target)
    judge_path = Path(spec.model).expanduser() if spec.kind != "openai" else None
    judge_config = _config(judge_path) if judge_path and judge_path.is_dir() else {}
    judge_names = [spec.model, judge_config.get("_name_or_path", "")]
    reasons = []
    base = target.base_model[0] if target.base_model else None
    if base and (spec.model == base or (judge_path and Path(base).expanduser() == judge_path)):
        reasons.append(f"the judge {spec.model!r} is the run's base model")
    judge_fam, model_fam = _families(*judge_names), _families(*names)
    shared = sorted(judge_fam & model_fam)
    if shared:
        reasons.append(f"judge and model share the family {', '.join(shared)}")
    if judge_config.get("model_type") and judge_config.get("model_type") == config.get("model_type"):
        reasons.append(f"judge and model have the same architecture (config model_type "
                       f"{config['model_type']!r})")
    return {"warning": bool(reasons), "reasons": reasons, "judge_families": sorted(judge_fam),
            "model_families": sorted(model_fam)}
