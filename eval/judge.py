"""Grade a model's answers with an LLM judge, MT-Bench style.

    python -m eval.judge RUN_DIR --judge openai:gpt-4o@https://api.openai.com/v1 --samples 3 --judge-temperature 0.7
    python -m eval.judge RUN_DIR --judge serve:/models/Qwen2.5-72B-Instruct --references reference_answer/gpt-4.jsonl
    python -m eval.judge RUN_DIR --judge local:smollm2            # in-process judge, output constrained to a rating
    python -m eval.judge RUN_DIR --judge ... --against RUN_DIR/baseline/answers/demo-baseline.jsonl   # pairwise

Single-answer grading 1–10 of every answered (question, turn); reference-guided for math/reasoning/coding;
turn 2 graded given turn 1. Judgments go to RUN_DIR/judgments/<judge>_single.jsonl (or _pair.jsonl); a rerun
repeats only calls that are missing or failed transiently. Exit status: 0 when every call was attempted and the
failed share is at most --max-failure-rate; 1 otherwise; 2 for bad input (nothing called); 130 if interrupted;
143 on SIGTERM, 129 on SIGHUP (a judge server started for the run is stopped in every case).
The API key is read from --api-key-env (needed only for non-loopback URLs) and never written anywhere; a judge URL
with a credential in it is refused (launch/credentials.py says why). --request-timeout bounds each attempt from
connecting to the last byte. Answers given to another text of a question (question_digest) are refused.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional

from eval.common import EvalError, Terminated, check_file_id, terminate_on_signals
from eval.judging.api_client import EndpointBackend, OpenAIJudge, RetrySettings, api_key_for, probe_models
from eval.judging.engine import JudgmentStore, Summary, build_items, run_judging
from eval.judging.prompts import load_prompt_set
from eval.judging.spec import JudgeSpec, parse_judge_spec
from eval.questions import (DEFAULT_QUESTIONS, answered_text, check_limit, load_answers, load_questions,
                            load_references)
from eval.target import Target, resolve_judge_model, resolve_target
from launch.credentials import redact

EXIT_OK, EXIT_FAILURES, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_SAMPLES = 100
"""Judgments per item at most: every sample is a judge call, and storage holds a slot per sample."""
DEFAULT_JUDGE = "local:smollm2"
"""The embedded default: SmolLM2-135M-Instruct in-process, constrained to a rating (exercises the pipeline; a
135M judge is no quality measure)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.judge", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="run directory, or an --out folder that holds answers/")
    p.add_argument("--judge", help="openai:MODEL@BASE_URL | local:PATH | serve:PATH (default: the recipe's, "
                                   "else local:smollm2)")
    p.add_argument("--samples", type=int, help="judgments per item; their median is the score (default 1)")
    p.add_argument("--judge-temperature", type=float, help="judge sampling temperature (default 0; >0 for K>1)")
    p.add_argument("--judge-max-tokens", type=int, help="new tokens per judgment (default 2048)")
    p.add_argument("--references", help="reference answers in model-answer format (default: inline 'reference')")
    p.add_argument("--judge-prompts", help="FastChat judge_prompts.jsonl to use instead of this project's prompts")
    p.add_argument("--against", help="answers file of another model: grade pairwise, in both orders")
    p.add_argument("--max-failure-rate", type=float, help="largest failed share of calls for exit status 0")
    p.add_argument("--api-key-env", help="NAME of the environment variable holding the API key (default: the "
                                          "recipe's eval.api_key_env, else OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (endpoints)")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds one attempt of a request may take in all, connect to last byte (a call ends within "
                        "--max-attempts times this plus the backoff waits)")
    p.add_argument("--max-attempts", type=int, default=4, help="attempts per request (retryable errors only)")
    p.add_argument("--backoff", type=float, default=1.0, help="first wait between attempts, doubling")
    p.add_argument("--strict-categories", action="store_true", help="an unknown category is an error")
    p.add_argument("--questions", help="question file the answers were generated from")
    p.add_argument("--limit", type=int, help="judge only answers to the first N questions (default: the recipe's)")
    p.add_argument("--model-id", help="which answers/<model_id>.jsonl to grade (default: the run's)")
    p.add_argument("--out", help="output folder when TARGET is not a run directory")
    p.add_argument("--judge-id", help="name of the judgments file (default: from the judge spec)")
    p.add_argument("--constrain", choices=["auto", "rating", "none"], default="auto",
                   help="force the judge's output to a bare rating (auto: for local:/serve: judges)")
    p.add_argument("--local-backend", choices=["auto", "vllm", "hf"],
                   help="engine for local: judges (default: the recipe's eval.backend, else auto)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="local/serve judge dtype")
    p.add_argument("--max-model-len", type=int, help="context window of a local/serve judge (default ≤ 4096)")
    p.add_argument("--serve-timeout", type=float, default=600.0, help="seconds to wait for vllm serve")
    p.add_argument("--seed", type=int, help="base seed of judge sampling")
    return p


def _answers_path(target: Target) -> Path:
    path = target.out.answers_file(target.model_id)
    if not path.is_file():
        others = sorted(p.stem for p in target.out.answers.glob("*.jsonl")) if target.out.answers.is_dir() else []
        hint = f" (answers there: {others}; pick one with --model-id)" if others else \
            f"; make it with `python -m eval.generate {target.run.root if target.run else 'MODEL --out DIR'}`"
        raise EvalError(f"answers file {path} does not exist{hint}")
    return path


def _choose(value, default):
    return default if value is None else value


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with terminate_on_signals():
            return _run(args)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        what = f"stopped by {e}" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}: judgments so far are saved; rerun the same command to continue", file=sys.stderr)
        return e.exit_status if isinstance(e, Terminated) else EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    if args.judge_id is not None:
        check_file_id("--judge-id", args.judge_id, "judgments/<judge_id>_single.jsonl")
    target = resolve_target(args.target, args.out, args.model_id)
    d = target.defaults
    spec = parse_judge_spec(args.judge or d.judge or DEFAULT_JUDGE)
    samples = _choose(args.samples, d.samples)
    temperature = _choose(args.judge_temperature, 0.0)
    max_rate = _choose(args.max_failure_rate, d.max_failure_rate)
    seed = _choose(args.seed, d.seed)
    _check_settings(samples, temperature, max_rate, args)
    api_key = api_key_for(spec, _choose(args.api_key_env, d.api_key_env), dict(os.environ))
    limit = _choose(args.limit, d.limit)
    check_limit(limit)
    all_questions = load_questions(_choose(args.questions, d.questions) or DEFAULT_QUESTIONS,
                                   strict_categories=args.strict_categories)
    questions = all_questions[:limit] if limit else all_questions
    ref_path = _choose(args.references, d.references)
    references = load_references(ref_path) if ref_path else {}
    prompts = load_prompt_set(args.judge_prompts)
    answers_path = _answers_path(target)
    if args.against and not Path(args.against).is_file():
        raise EvalError(f"--against file {args.against!r} does not exist")
    constrained = args.constrain == "rating" or (args.constrain == "auto" and spec.kind != "openai")
    retry = RetrySettings(timeout=args.request_timeout, max_attempts=args.max_attempts, backoff=args.backoff)

    if spec.kind == "openai":
        # probe first: a dead endpoint or a misspelt model fails before any answer is read
        _probe(spec, api_key, args.request_timeout)
    selection = (all_questions, "--limit" if args.limit is not None else "the recipe's eval.limit")
    items = _items(target, answers_path, questions, references, prompts, args.against, selection)
    judge_id = args.judge_id or spec.judge_id
    kind = "pair" if args.against else "single"
    store = JudgmentStore(target.out.judgments_file(judge_id, kind))
    meta = {"judge": judge_id, "judge_spec": redact(str(spec)), "prompts_source": prompts.source,
            "samples": samples, "judge_temperature": temperature, "seed": seed}
    run = dict(samples=samples, temperature=temperature, max_tokens=_choose(args.judge_max_tokens,
               target.defaults.judge_max_new_tokens), seed=seed, meta=meta)

    if spec.kind == "openai":
        backend = EndpointBackend(OpenAIJudge(spec, api_key, retry), args.concurrency, constrained)
        summary = run_judging(items, store, backend, **run)
    elif spec.kind == "serve":
        summary = _judge_served(spec, target, items, store, retry, args, constrained, run)
    else:
        summary = _judge_local(spec, target, items, store, args, constrained, run)
    return _report(summary, store.path, max_rate)


def _check_settings(samples: int, temperature: float, max_rate: float, args: argparse.Namespace) -> None:
    if not 1 <= samples <= MAX_SAMPLES:
        raise EvalError(f"--samples is {samples}; expected a positive integer of at most {MAX_SAMPLES} (each sample "
                        f"is one more judge call per item)")
    if not 0 <= temperature < math.inf:
        raise EvalError(f"--judge-temperature is {temperature}; expected a finite number >= 0")
    if samples > 1 and temperature == 0:
        raise EvalError(f"--samples {samples} needs --judge-temperature above 0: at temperature 0 every sample "
                        f"repeats the first")
    if not 0.0 <= max_rate <= 1.0:
        raise EvalError(f"--max-failure-rate is {max_rate}; expected a fraction between 0 and 1")
    # a NaN fails every comparison, so the ranges are written to be true only for finite values
    if args.concurrency < 1 or args.max_attempts < 1 or not 0 < args.request_timeout < math.inf \
            or not 0 <= args.backoff < math.inf:
        raise EvalError("--concurrency and --max-attempts must be >= 1, --request-timeout a finite number > 0, "
                        f"--backoff a finite number >= 0 (got {args.concurrency}, {args.max_attempts}, "
                        f"{args.request_timeout}, {args.backoff})")
    for flag, value in (("--judge-max-tokens", args.judge_max_tokens), ("--max-model-len", args.max_model_len)):
        if value is not None and value < 1:
            raise EvalError(f"{flag} is {value}; expected a positive number of tokens")


def _probe(spec: JudgeSpec, api_key: Optional[str], timeout: float) -> None:
    served = probe_models(spec.base_url or "", api_key, min(timeout, 30.0))
    if served and spec.model not in served:
        raise EvalError(f"judge endpoint {spec.base_url} does not serve model {spec.model!r}; it serves "
                        f"{served[:20]}")


def _items(target: Target, answers_path: Path, questions, references, prompts, against: Optional[str],
           selection: tuple[list, str]):
    answers = load_answers(answers_path)
    _check_outside_limit(answers, answers_path, questions, *selection)
    _check_answered_text(answers_path, questions)
    if against:
        _check_outside_limit(load_answers(against), Path(against), questions, *selection)
        _check_answered_text(Path(against), questions)
    unanswered = [q.question_id for q in questions if q.question_id not in answers]
    if unanswered:
        print(f"note: {len(unanswered)} of {len(questions)} questions have no answer in {answers_path} and are not "
              f"judged (first: {unanswered[:5]})", file=sys.stderr)
    other = None
    if against:
        other = (_model_id_of(Path(against)), load_answers(against))
    return build_items(questions, answers, target.model_id, prompts, references, other)


def _check_outside_limit(answers, answers_path: Path, questions, all_questions, limit_source: str) -> None:
    """Answers to questions the file holds but the limit leaves out: generated with a larger limit than judged."""
    if len(questions) == len(all_questions):
        return
    position = {q.question_id: i for i, q in enumerate(all_questions)}
    outside = [qid for qid in answers if position.get(qid, -1) >= len(questions)]
    if outside:
        needed = max(position[qid] for qid in outside) + 1
        raise EvalError(
            f"answers file {answers_path} holds answers to {len(outside)} question(s) {outside[:10]} beyond the "
            f"first {len(questions)} that {limit_source} selects: the answers were generated with a larger limit. "
            f"Judge them all with --limit {needed} (or the limit they were generated with), or regenerate the "
            f"answers with limit {len(questions)}")


def _check_answered_text(answers_path: Path, questions) -> None:
    """Answers given to another text of a question (the questions file changed since they were generated) would
    be graded against a question they do not answer."""
    from eval.common import read_jsonl

    records = {r.get("question_id"): r for _, r in read_jsonl(answers_path, "answers")}
    changed, _ = answered_text(records, questions)
    if changed:
        raise EvalError(f"answers file {answers_path}: the answers to question(s) {changed[:10]} were given to "
                        f"another text of those questions (their question_digest differs); answer them again with "
                        f"python -m eval.generate (it regenerates changed questions), or judge with the questions "
                        f"file they were answered from (--questions)")


def _model_id_of(path: Path) -> str:
    from eval.common import read_jsonl

    rows = read_jsonl(path, "answers")
    return str(rows[0][1].get("model_id") or path.stem) if rows else path.stem


def _judge_served(spec, target, items, store, retry, args, constrained, run) -> Summary:
    from eval.judging.server import VllmServer

    model_dir = resolve_judge_model(spec.model, target)
    log = target.out.logs / f"vllm_serve_{spec.judge_id}.log"
    with VllmServer(model_dir, served_name=spec.judge_id, log_path=log, dtype=args.dtype,
                    max_model_len=args.max_model_len, startup_timeout=args.serve_timeout) as server:
        served = JudgeSpec("openai", spec.judge_id, server.base_url)
        _probe(served, None, args.request_timeout)
        backend = EndpointBackend(OpenAIJudge(served, None, retry), args.concurrency, constrained)
        return run_judging(items, store, backend, **run)


def _judge_local(spec, target, items, store, args, constrained, run) -> Summary:
    from eval.judging.local import LocalBackend

    model_dir = resolve_judge_model(spec.model, target)
    backend = LocalBackend(model_dir, args.local_backend or target.defaults.backend, args.dtype, constrained,
                           run["seed"],
                           max_model_len=args.max_model_len)
    try:
        return run_judging(items, store, backend, **run)
    finally:
        backend.close()


def _report(summary: Summary, path: Path, max_rate: float) -> int:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.by_reason.items())) or "none"
    print(f"judged {summary.items} items: {summary.calls} calls ({summary.new_calls} made now), "
          f"{summary.failed_calls} failed ({summary.failure_share:.1%}; {reasons}); judgments in {path}")
    if summary.unattempted:
        print(f"{summary.unattempted} calls were not attempted; rerun to finish", file=sys.stderr)
        return EXIT_FAILURES
    if summary.failure_share > max_rate:
        print(f"failure share {summary.failure_share:.1%} is above --max-failure-rate {max_rate:.1%}",
              file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
