"""Answers for many runs of one base from one vLLM engine: each run's exported LoRA (launch.export) is applied per
request, and the base itself answers for every run's baseline.

    python -m eval.generate RUN_A RUN_B ... --backend vllm --adapters lora

Every run must hold lora/ (python -m launch.export RUN --to lora), and all of them must apply to the same base
(the export reports' base_key). Answers land exactly where `eval.generate RUN` and `eval.generate RUN/baseline`
put them (answers/<model_id>.jsonl, resumable); answers/<model_id>.meta.json adds the export's figures. The
baseline is generated once per distinct chat template and written into each run's baseline/answers/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from eval.answers.answering import answer_questions, pending_answers, save_answers
from eval.answers.chat_template import load_tokenizer, template_sha256
from eval.answers.generators import pick_backend
from eval.common import EvalError, atomic_write_json
from eval.questions import DEFAULT_QUESTIONS, load_questions
from eval.target import Target, resolve_target

EXPORT_REPORT = "export_report.json"


def _lora_of(target: Target) -> tuple[Path, dict, dict]:
    """(lora dir, adapter config, export report) of a run; a clear error when the run was not exported."""
    run = target.run
    if run is None or run.root.name == "baseline" or not run.recipe.is_file():
        raise EvalError(f"--adapters lora takes run directories made by python -m launch.train; got "
                        f"{target.model_spec or (run.root if run else '?')}")
    lora = run.root / "lora"
    config, report = lora / "adapter_config.json", lora / EXPORT_REPORT
    if not (config.is_file() and report.is_file()):
        raise EvalError(f"{run.root} has no exported LoRA ({lora} is missing or incomplete); make it with "
                        f"`python -m launch.export {run.root} --to lora`")
    return lora, json.loads(config.read_text()), json.loads(report.read_text())


def _baseline_target(target: Target) -> Target:
    baseline = target.run.baseline_run()  # type: ignore[union-attr]
    baseline.root.mkdir(parents=True, exist_ok=True)
    return resolve_target(str(baseline.root), None, None)


def run_sweep(args: argparse.Namespace) -> int:
    """Generate the baselines' and every run's answers with one engine; see the module docstring."""
    from eval.answers.generators import VLLMLoraGenerator

    if args.out or args.model_id:
        raise EvalError("--out and --model-id name one model; with --adapters lora every run writes its own answers")
    if (args.backend or "vllm") != "vllm":
        raise EvalError(f"--adapters lora serves every run from one vLLM engine; --backend is {args.backend!r}, "
                        f"expected vllm")
    pick_backend("vllm")
    runs = [resolve_target(t, None, None) for t in [args.target, *args.more]]
    if len({t.run.root for t in runs if t.run}) != len(runs):
        raise EvalError("a run directory is listed twice")
    exports = [_lora_of(t) for t in runs]
    keys = {report["base_key"] for _, _, report in exports}
    if len(keys) != 1:
        listing = ", ".join(f"{t.run.root.name}: {r['base_key']}" for t, (_, _, r) in zip(runs, exports))
        raise EvalError(f"the runs apply to different bases ({listing}); one engine serves one base")
    base = Path(exports[0][1]["base_model_name_or_path"])
    d = runs[0].defaults
    pick = lambda value, default: default if value is None else value  # noqa: E731
    questions_path = Path(pick(args.questions, d.questions) or DEFAULT_QUESTIONS)
    questions = load_questions(questions_path, limit=pick(args.limit, d.limit), strict_categories=args.strict_categories)
    settings = {"max_new": pick(args.max_new_tokens, d.max_new_tokens), "seed": pick(args.seed, d.seed),
                "temperature": args.temperature, "batch": args.batch or 64}
    if settings["max_new"] <= 0:
        raise EvalError(f"--max-new-tokens is {settings['max_new']}; expected a positive integer")
    baselines = [_baseline_target(t) for t in runs]
    engine = VLLMLoraGenerator(base, args.dtype, args.max_model_len, settings["seed"],
                               max_lora_rank=max(c["r"] for _, c, _ in exports), max_loras=min(len(runs), 8))
    common = {"backend": "vllm", "adapters": "lora", "base": str(base), "dtype": args.dtype,
              "questions": str(questions_path.resolve()), "max_new_tokens": settings["max_new"],
              "temperature": args.temperature, "seed": settings["seed"], "max_model_len": engine.max_model_len}
    try:
        by_template: dict[str, list[Target]] = {}
        for b in baselines:
            by_template.setdefault(b.template.read_text(encoding="utf-8") if b.template else "", []).append(b)
        for group in by_template.values():
            _generate(group, engine.adapter(None), base, questions, settings, {**common, "lora": None})
        for target, (lora, _, report) in zip(runs, exports):
            export = {k: report.get(k) for k in ("r", "exact_rank_max", "worst_layer", "worst_layer_error",
                                                 "truncated_layers", "probe")}
            _generate([target], engine.adapter(target.model_id, lora), base, questions, settings,
                      {**common, "lora": str(lora), "export": export})
    finally:
        engine.close()
    return 0


def _generate(targets: list[Target], generator, base: Path, questions, settings: dict, meta: dict) -> None:
    """Answer the questions any of `targets` still lacks, once, and save them into each target's answers file."""
    state = {id(t): pending_answers(t.out.answers_file(t.model_id), questions) for t in targets}
    todo_ids = {q.question_id for t in targets for q in state[id(t)][2]}
    todo = [q for q in questions if q.question_id in todo_ids]
    template = targets[0].template.read_text(encoding="utf-8") if targets[0].template else None
    tokenizer = load_tokenizer(base, template)
    started = time.monotonic()
    for start in range(0, len(todo), settings["batch"]):
        chunk = todo[start:start + settings["batch"]]
        answers = answer_questions(chunk, tokenizer, generator, settings["max_new"], settings["temperature"],
                                   settings["seed"])
        for t in targets:
            done, kept, pending = state[id(t)]
            wanted = {q.question_id for q in pending}
            done.update({q.question_id: turns for q, turns in zip(chunk, answers) if q.question_id in wanted})
            save_answers(t.out.answers_file(t.model_id), questions, done, kept, t.model_id)
        print(f"{', '.join(t.model_id for t in targets)}: answered {min(start + settings['batch'], len(todo))}/"
              f"{len(todo)} ({time.monotonic() - started:.0f} s)")
    for t in targets:
        path = t.out.answers_file(t.model_id)
        atomic_write_json(path.with_suffix(".meta.json"), {
            "model_id": t.model_id, "model": meta["base"], **meta,
            "template": str(t.template) if t.template else "tokenizer's own",
            "template_sha256": template_sha256(tokenizer)})
        print(f"answers: {path}")
