"""How far to trust the judge: position, repeat, length and label audits on a seeded sample of a run's answers.

    python -m eval.audit RUN_DIR --judge openai:gpt-4o@https://api.openai.com/v1 --judge-temperature 0.7
    python -m eval.audit RUN_DIR RUN_DIR/baseline --judge local:smollm2 --sample 10       # + pairwise figures
    python -m eval.audit RUN_DIR RUN_DIR/baseline --judge ... --labels mt_bench_human_judgments.jsonl

The judge is called exactly as `python -m eval.judge` calls it (the same flags: --questions, --references,
--judge-prompts, --request-timeout, --max-attempts, ...; the same prompts, retries and failure records), on
`--sample N` questions drawn with `--seed`. Each item is judged `--samples K` times (default 2, at least 2) at the
run's judge temperature (from its judgments; --judge-temperature overrides), in the run's answers and with neutral
padding, and, with a second model (BASELINE_DIR or --against FILE), pairwise in both orders. Calls go to
RUN_DIR/audit/<judge>/judgments.jsonl and are resumable like the judge's; the figures (see
eval/auditing/figures.py) go to RUN_DIR/audit/<judge>/audit.json, which eval.report shows beside the scores.
Exit status as eval.judge: 0, 1 (calls failed or unattempted), 2 (bad input, nothing called), 130/143/129.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from eval import judge
from eval.auditing.family import self_preference
from eval.auditing.figures import audit_failures, label_figures, length_figures, pairwise_figures, \
    repeatability_single
from eval.auditing.labels import Labels, labelled_questions, load_labels
from eval.auditing.probes import AuditItems, audit_items, sample_questions
from eval.common import EvalError, atomic_write_json, check_file_id
from eval.judging.api_client import api_key_for
from eval.judging.engine import JudgmentStore
from eval.judging.prompts import load_prompt_set
from eval.judging.spec import parse_judge_spec
from eval.questions import DEFAULT_QUESTIONS, check_limit, load_answers, load_questions, load_references
from eval.target import Target, resolve_target
from launch.credentials import redact

DEFAULT_SAMPLE = 10
"""Questions audited by default: 20 question-turns, K=2 repeats, padding and both orders make 120 calls with a
second model — minutes on an API judge."""
AUDIT_FILE = "audit.json"


def audit_dir(target_root: Path, judge_id: str) -> Path:
    """Where the audit of one judge on one run lives: RUN_DIR/audit/<judge_id>/."""
    return Path(target_root) / "audit" / judge_id


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.audit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False,
                                parents=[judge.build_parser()])  # the judge's own flags, one definition
    p.add_argument("baseline", nargs="?", help="a second run directory (e.g. RUN_DIR/baseline): audit pairwise "
                                               "judging of RUN_DIR against its answers")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help="questions to audit, drawn with --seed "
                                                                      f"(default {DEFAULT_SAMPLE})")
    p.add_argument("--labels", help="reference labels: FastChat human judgments (question_id, model_a, model_b, "
                                    "winner, turn, judge) or single scores (question_id, turn, score) JSONL")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    return judge.run_guarded(_run, build_parser().parse_args(argv), "audit calls")


def _settings(args: argparse.Namespace, target: Target, judge_id: str) -> dict[str, Any]:
    samples = 2 if args.samples is None else args.samples
    if not 2 <= samples <= judge.MAX_SAMPLES:
        raise EvalError(f"--samples is {samples}; the audit needs at least 2 judgments per item to measure "
                        f"repeatability, and at most {judge.MAX_SAMPLES}")
    temperature = args.judge_temperature
    if temperature is None:
        temperature = _run_temperature(target, judge_id)
    if not 0 <= temperature < math.inf:
        raise EvalError(f"--judge-temperature is {temperature}; expected a finite number >= 0")
    max_rate = target.defaults.max_failure_rate if args.max_failure_rate is None else args.max_failure_rate
    if not 0.0 <= max_rate <= 1.0:
        raise EvalError(f"--max-failure-rate is {max_rate}; expected a fraction between 0 and 1")
    judge.check_call_flags(args)
    seed = target.defaults.seed if args.seed is None else args.seed
    max_tokens = target.defaults.judge_max_new_tokens if args.judge_max_tokens is None else args.judge_max_tokens
    return dict(samples=samples, temperature=temperature, max_rate=max_rate, seed=seed, max_tokens=max_tokens)


def _run_temperature(target: Target, judge_id: str) -> float:
    """The temperature the run's own judgments of this judge were made at (0 when it has none)."""
    for kind in ("single", "pair"):
        path = target.out.judgments_file(judge_id, kind)
        if path.is_file():
            temps = {r.get("judge_temperature") for r in JudgmentStore(path).rows.values()} - {None}
            if len(temps) == 1:
                return float(temps.pop())
    return 0.0


def _other(args: argparse.Namespace) -> Optional[tuple[str, dict, Path]]:
    """The second model's id, answers and answers file: BASELINE_DIR's answers, or --against FILE."""
    if args.baseline and args.against:
        raise EvalError("give either BASELINE_DIR or --against FILE for the pairwise audit, not both")
    if args.against:
        path = Path(args.against)
        if not path.is_file():
            raise EvalError(f"--against file {args.against!r} does not exist")
        return judge.model_id_of(path), load_answers(path), path
    if args.baseline:
        other = resolve_target(args.baseline, None, None)
        path = other.out.answers_file(other.model_id)
        if not path.is_file():
            raise EvalError(f"BASELINE_DIR {args.baseline} has no answers file {path}; make it with "
                            f"`python -m eval.generate {args.baseline}`")
        return other.model_id, load_answers(path), path
    return None


def _run(args: argparse.Namespace) -> int:
    if args.judge_id is not None:
        check_file_id("--judge-id", args.judge_id, "audit/<judge_id>/")
    target = resolve_target(args.target, args.out, args.model_id)
    d = target.defaults
    spec = parse_judge_spec(args.judge or d.judge or judge.DEFAULT_JUDGE)
    judge_id = args.judge_id or spec.judge_id
    s = _settings(args, target, judge_id)
    api_key = api_key_for(spec, d.api_key_env if args.api_key_env is None else args.api_key_env, dict(os.environ))
    limit = d.limit if args.limit is None else args.limit
    check_limit(limit)
    questions = load_questions(args.questions or d.questions or DEFAULT_QUESTIONS,
                               strict_categories=args.strict_categories)
    questions = questions[:limit] if limit else questions
    ref_path = args.references or d.references
    references = load_references(ref_path) if ref_path else {}
    prompts = load_prompt_set(args.judge_prompts)
    answers_path = judge.answers_file_of(target)
    judge.check_answered_text(answers_path, questions)
    answers = load_answers(answers_path)
    other = _other(args)
    if other is not None:
        judge.check_answered_text(other[2], questions)
    labels = load_labels(args.labels) if args.labels else None
    eligible = _eligible(answers, other, labels, target.model_id)
    chosen = sample_questions(questions, eligible, args.sample, s["seed"])
    items = audit_items(chosen, answers, target.model_id, prompts, references, other[:2] if other else None)
    warning = self_preference(spec, target)
    if spec.kind == "openai":
        judge.probe_judge(spec, api_key, args.request_timeout)

    folder = audit_dir(target.out.root, judge_id)
    store = JudgmentStore(folder / "judgments.jsonl")
    meta = {"judge": judge_id, "judge_spec": redact(str(spec)), "prompts_source": prompts.source,
            "samples": s["samples"], "judge_temperature": s["temperature"], "seed": s["seed"], "audit": True}
    run = dict(samples=s["samples"], temperature=s["temperature"], max_tokens=s["max_tokens"], seed=s["seed"],
               meta=meta)
    summary = judge.judge_with(spec, target, items.all, store, args, api_key, run)
    figures = _figures(store, items, answers, labels, s["seed"])
    record = {"model": target.model_id, "against": other[0] if other else None, "judge": meta,
              "sample": {"requested": args.sample, "questions": [q.question_id for q in chosen],
                         "items": len(items.single), "seed": s["seed"]},
              "self_preference": warning, **figures, "failures": audit_failures(store, items.all)}
    atomic_write_json(folder / AUDIT_FILE, record)
    _print(record, folder / AUDIT_FILE)
    return judge.report_summary(summary, store.path, s["max_rate"])


def _eligible(answers: dict, other, labels: Optional[Labels], model: str) -> set:
    eligible = set(answers)
    if other is not None:
        eligible &= set(other[1])
    if labels is not None:
        labelled = labelled_questions(labels, model, other[0] if other else None)
        if not labelled & eligible:
            about = f"{model!r} against {other[0]!r}" if other and labels.kind == "pair" else repr(model)
            hint = " (FastChat labels are pairwise: give BASELINE_DIR or --against)" \
                if labels.kind == "pair" and other is None else ""
            raise EvalError(f"labels file {labels.path}: no label is about {about} on an answered question{hint}")
        eligible &= labelled
    return eligible


def _figures(store: JudgmentStore, items: AuditItems, answers: dict, labels: Optional[Labels],
             seed: int) -> dict[str, Any]:
    not_measured = {"value": None, "ci95": None, "n": 0, "note": "no second model: give BASELINE_DIR or --against"}
    out: dict[str, Any] = repeatability_single(store, items.single, seed)
    out |= length_figures(store, items.single, items.padded, answers, seed)
    if items.pair:
        out |= pairwise_figures(store, items.pair, seed)
    else:
        out |= {k: not_measured for k in ("position_consistency", "first_position_preference", "repeat_flip_rate")}
    if labels is not None:
        out["label_agreement"] = label_figures(labels, store, items.single, items.pair, seed)
    return out


def _print(record: dict[str, Any], path: Path) -> None:
    from eval.auditing.section import audit_lines

    print("\n".join(audit_lines(record)))
    print(f"audit figures in {path}")


if __name__ == "__main__":
    sys.exit(main())
