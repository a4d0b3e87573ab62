"""Generate MT-Bench-style answers (FastChat's model-answer format) with vLLM or transformers.

    python -m eval.generate RUN_DIR                                   # merged model, recorded template, recipe defaults
    python -m eval.generate RUN_DIR/baseline                          # the same base without ΔW
    python -m eval.generate /models/my-model --out runs/x --questions mt_bench/question.jsonl --backend vllm
    python -m eval.generate RUN_A RUN_B ... --backend vllm --adapters lora   # one engine, each run's exported LoRA

Every conversation goes through the run's template.jinja (the one training used). Turn 2 is answered with
turn 1 and its answer in context. Temperatures follow MT-Bench per category (writing/roleplay 0.7, stem/humanities
0.1, others 0; unknown categories 0.7 unless --strict-categories); --temperature overrides them all. Answers go
to answers/<model_id>.jsonl, rewritten atomically after each batch; a rerun skips questions answered to the same
text (each answer records a hash of its question's turns: a question whose turns changed is answered again, and the
rerun says which; delete the file to answer all again). A merged checkpoint whose merge_report.json says it lost the
trained ΔW is refused unless --allow-lossy. Exit status 0 on success, 2 for bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from eval.answers.answering import answer_questions, pending_answers, save_answers
from eval.answers.chat_template import load_tokenizer, template_sha256
from eval.answers.generators import make_generator, pick_backend
from eval.common import EvalError, atomic_write_json
from eval.questions import DEFAULT_QUESTIONS, load_questions
from eval.progress import Progress
from eval.target import check_merge_report, model_dir_of, resolve_target
from launch.models import shared_cache

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="run directory, or a model (transformers dir, .gguf, smollm2) with --out")
    p.add_argument("--questions", help="FastChat question.jsonl (default: the recipe's, else the embedded set)")
    p.add_argument("--backend", choices=["auto", "vllm", "hf"], help="auto: vLLM when installed")
    p.add_argument("--limit", type=int, help="answer only the first N questions")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per turn (default 1024)")
    p.add_argument("--temperature", type=float, help="one temperature for every category")
    p.add_argument("--strict-categories", action="store_true", help="an unknown category is an error")
    p.add_argument("--out", help="output folder (required when TARGET is a model)")
    p.add_argument("--model-id", help="name of the answers file (default: the recipe name)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="weights dtype")
    p.add_argument("--max-model-len", type=int, help="context window (default: the model's, at most 4096)")
    p.add_argument("--seed", type=int, help="sampling seed (default: the recipe's, else 0)")
    p.add_argument("--batch", type=int, help="questions per batch between saves (default 64 vLLM, 4 hf)")
    p.add_argument("more", nargs="*", metavar="RUN", help="further run directories (with --adapters lora)")
    p.add_argument("--adapters", choices=["merged", "lora"], default="merged",
                   help="merged: TARGET's merged weights; lora: one vLLM engine on the shared base serves every "
                        "run's exported LoRA (python -m launch.export RUN --to lora) and the baselines")
    p.add_argument("--allow-lossy", action="store_true",
                   help="answer with a checkpoint whose merge report says it lost the trained ΔW")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.adapters == "lora":
            from eval.answers.lora_sweep import run_sweep

            return run_sweep(args)
        if args.more:
            raise EvalError(f"several TARGETs ({args.target}, {', '.join(args.more)}) need --adapters lora")
        return _run(args)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _pick(value, default):
    return default if value is None else value


def _run(args: argparse.Namespace) -> int:
    target = resolve_target(args.target, args.out, args.model_id)
    d = target.defaults
    questions_path = Path(_pick(args.questions, d.questions) or DEFAULT_QUESTIONS)
    questions = load_questions(questions_path, limit=_pick(args.limit, d.limit),
                               strict_categories=args.strict_categories)
    max_new = _pick(args.max_new_tokens, d.max_new_tokens)
    if max_new <= 0:
        raise EvalError(f"--max-new-tokens is {max_new}; expected a positive integer")
    if args.temperature is not None and not 0 <= args.temperature < math.inf:
        raise EvalError(f"--temperature is {args.temperature}; expected a finite number >= 0")
    for flag, value in (("--batch", args.batch), ("--max-model-len", args.max_model_len)):
        if value is not None and value < 1:
            raise EvalError(f"{flag} is {value}; expected a positive integer")
    seed = _pick(args.seed, d.seed)
    backend = pick_backend(_pick(args.backend, d.backend))  # type: ignore[arg-type]
    model_dir = model_dir_of(target, shared_cache())
    check_merge_report(model_dir, args.dtype, args.allow_lossy)
    answers_path = target.out.answers_file(target.model_id)
    done, kept, todo = pending_answers(answers_path, questions)
    print(f"{len(questions) - len(todo)} of {len(questions)} questions already answered in {answers_path}")
    if not todo:
        return EXIT_OK

    template = target.template.read_text(encoding="utf-8") if target.template else None
    tokenizer = load_tokenizer(model_dir, template)
    generator = make_generator(backend, model_dir, args.dtype, args.max_model_len, seed)
    meta = {"model_id": target.model_id, "model": str(model_dir), "backend": backend, "dtype": args.dtype,
            "questions": str(questions_path.resolve()), "template": str(target.template) if target.template else
            "tokenizer's own", "template_sha256": template_sha256(tokenizer),
            "max_new_tokens": max_new, "temperature": args.temperature, "seed": seed,
            "max_model_len": generator.max_model_len}
    batch = args.batch or (64 if backend == "vllm" else 4)
    try:
        with Progress(total=len(todo), what="questions answered") as progress:
            for start in range(0, len(todo), batch):
                chunk = todo[start:start + batch]
                for q, turns in zip(chunk, answer_questions(chunk, tokenizer, generator, max_new, args.temperature,
                                                            seed)):
                    done[q.question_id] = turns
                save_answers(answers_path, questions, done, kept, target.model_id)
                progress.update(len(chunk))
    finally:
        generator.close()
    atomic_write_json(answers_path.with_suffix(".meta.json"), meta)
    print(f"answers: {answers_path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
