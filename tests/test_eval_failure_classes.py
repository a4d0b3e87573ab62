"""Failure classes of the eval stages, each with its reproduction and rows of a table:

- answers are resumed only for the same question text (a hash of its turns), changed ones are answered again;
- a judge request is bounded as a whole (a server that drips one byte at a time cannot hold it);
- a credential inside a judge URL is refused everywhere the URL enters (eval.judge, recipes, Slurm), no message
  echoes it, and a stored spec that holds one (an older judgments file) is redacted in reports;
- two judges writing one judgments file (two models, two processes) keep every row of both;
- ids and sizes from the command line are checked before anything is read, written or allocated.

Table rows assert exit status 2, a message naming the flag/field and what was expected, that a secret in the input
appears nowhere in the output, and that no file was created or changed (hashes before and after).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from cli_table import run_main, snapshot
from drip_server import DripServer
from eval_helpers import FakeJudgeServer, make_questions, make_run, write_jsonl

SECRET = "sk-TOPSECRET0123456789"
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the table
@dataclass
class Row:
    id: str
    cli: str
    """judge | report | generate | submit"""
    args: Callable[[Path, str], list[str]]
    """(case folder, a live fake judge's URL) → argv"""
    expect: tuple[str, ...]
    """Regexes that must all appear in the output."""


def _judged_run(d: Path) -> Path:
    """A run-shaped folder with answers and one judgments file (as eval.judge writes it)."""
    root = make_run(d / "run")
    rows = [{"question_id": q["question_id"], "model": "tuned", "model_b": None, "turn": t, "category": q["category"],
             "judge": "fake-judge", "judge_spec": "openai:fake-judge@http://127.0.0.1:9/v1", "score": 5.0,
             "calls": {"single": [{"value": 5.0, "judgment": "[[5]]", "attempts": 1}]}}
            for q in make_questions() for t in (1, 2)]
    write_jsonl(root / "judgments" / "fake-judge_single.jsonl", rows)
    return root


def _judge(*extra: str):
    def args(d: Path, url: str) -> list[str]:
        root = make_run(d / "run")
        return [str(root), "--judge", url, "--questions", str(root / "questions.jsonl"), *extra]
    return args


def _judge_spec(spec: str):
    def args(d: Path, url: str) -> list[str]:
        root = make_run(d / "run")
        return [str(root), "--judge", spec.replace("URL", url.split("//", 1)[1]), "--questions",
                str(root / "questions.jsonl")]
    return args


def _judge_changed_question(d: Path, url: str) -> list[str]:
    """Answers generated for one text of question 1, judged with a questions file where question 1 reads otherwise."""
    from eval.questions import digest

    questions = make_questions()
    root = make_run(d / "run", questions=questions)
    answers = root / "answers" / "tuned.jsonl"
    records = [json.loads(l) for l in answers.read_text().splitlines()]
    write_jsonl(answers, [r | {"question_digest": digest(q["turns"])} for r, q in zip(records, questions)])
    questions[0]["turns"] = ["Another first question?", "Another second one?"]
    write_jsonl(root / "questions.jsonl", questions)
    return [str(root), "--judge", url, "--questions", str(root / "questions.jsonl")]


def _report(*extra: str):
    return lambda d, url: [str(_judged_run(d)), *extra]


def _generate(*extra: str):
    return lambda d, url: [str(make_run(d / "run")), "--out", str(d / "run"), *extra]


def _recipe(d: Path, **eval_section) -> Path:
    recipe = {"name": "creds", "run_dir": str(d / "out"), "model": {"path": str(d / "model")},
              "adapter": {"method": "ssh", "n": 8, "target_modules": ["q_proj"]}, "data": {"path": str(d / "d.json")},
              "eval": eval_section}
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _submit(override: str = "", **eval_section):
    def args(d: Path, url: str) -> list[str]:
        return [str(_recipe(d, **eval_section)), *([override] if override else []), "--nodes", "1",
                "--gpus-per-node", "0", "--dry-run"]
    return args


ID = r"plain file-name component"
CRED = (r"carries a credential", r"environment variable")
ROWS = [
    # ids that would leave their folder
    Row("judge --model-id ../x", "judge", _judge("--model-id", "../x"), (r"--model-id is '\.\./x'", ID)),
    Row("judge --judge-id ../..", "judge", _judge("--judge-id", "../.."), (r"--judge-id is '\.\./\.\.'", ID)),
    Row("judge --judge-id .", "judge", _judge("--judge-id", "."), (r"--judge-id is '\.'", ID)),
    Row("judge --judge-id a/b", "judge", _judge("--judge-id", "a/b"), (r"--judge-id is 'a/b'", ID, r"'a-b'")),
    Row("generate --model-id ../x", "generate", _generate("--model-id", "../x"), (r"--model-id is '\.\./x'", ID)),
    Row("report --model-id ../x", "report", _report("--model-id", "../x"), (r"--model-id is '\.\./x'", ID)),
    Row("report --judge-id ../..", "report", _report("--judge-id", "../.."), (r"--judge-id is '\.\./\.\.'", ID)),
    # answers given to another text of the question
    Row("judge answers to a changed question", "judge", _judge_changed_question,
        (r"answers file .*tuned\.jsonl", r"question\(s\) \[1\]", r"another text", r"eval\.generate")),
    # sizes
    Row("report --resamples 1e9", "report", _report("--resamples", "1000000000"),
        (r"--resamples is 1000000000", r"to 100,000")),
    Row("report --resamples 10", "report", _report("--resamples", "10"), (r"--resamples is 10", r"from 100")),
    Row("judge --request-timeout nan", "judge", _judge("--request-timeout", "nan"),
        (r"--request-timeout a finite number > 0", r"nan")),
    Row("judge --request-timeout inf", "judge", _judge("--request-timeout", "inf"),
        (r"--request-timeout a finite number > 0", r"inf")),
    Row("judge --backoff nan", "judge", _judge("--backoff", "nan"), (r"--backoff a finite number >= 0",)),
    Row("judge --samples 1000000000", "judge", _judge("--samples", "1000000000", "--judge-temperature", "1"),
        (r"--samples is 1000000000", r"at most 100\b")),
    Row("judge --judge-temperature nan", "judge", _judge("--judge-temperature", "nan"),
        (r"--judge-temperature is nan", r"finite number >= 0")),
    Row("judge --judge-max-tokens 0", "judge", _judge("--judge-max-tokens", "0"),
        (r"--judge-max-tokens is 0", r"positive number of tokens")),
    Row("judge --max-model-len -5", "judge", _judge("--max-model-len", "-5"), (r"--max-model-len is -5", "positive")),
    Row("generate --batch 0", "generate", _generate("--batch", "0"), (r"--batch is 0", r"positive integer")),
    Row("generate --max-model-len 0", "generate", _generate("--max-model-len", "0"),
        (r"--max-model-len is 0", r"positive integer")),
    Row("generate --temperature inf", "generate", _generate("--temperature", "inf"),
        (r"--temperature is inf", r"finite number >= 0")),
    # credentials
    Row("judge URL with user:key@", "judge", _judge_spec(f"openai:fake-judge@http://user:{SECRET}@URL"),
        (r"--judge 'openai:fake-judge@http://\*\*\*@127\.0\.0\.1", r"user:password@", *CRED)),
    Row("judge URL with key@", "judge", _judge_spec(f"openai:fake-judge@http://{SECRET}@URL"), CRED),
    Row("judge URL with ?api_key=", "judge", _judge_spec(f"openai:fake-judge@http://URL?api_key={SECRET}"),
        (r"query parameter 'api_key'", *CRED)),
    Row("judge bare URL with a key", "judge", _judge_spec(f"http://user:{SECRET}@URL"), CRED),
    Row("judge --api-key-env holding a key", "judge", _judge("--api-key-env", SECRET),
        (r"--api-key-env takes the NAME", r"not shown")),
    Row("submit recipe eval.judge with a key", "submit",
        _submit(judge=f"openai:gpt-4o@https://u:{SECRET}@api.example.com/v1"), (r"eval\.judge", *CRED)),
    Row("submit override eval.judge with a key", "submit",
        _submit(f"eval.judge=openai:gpt-4o@https://api.example.com/v1?token={SECRET}"),
        (r"eval\.judge", r"query parameter 'token'", *CRED)),
    Row("train recipe eval.judge with a key", "train",
        lambda d, url: [str(_recipe(d, judge=f"openai:m@http://k:{SECRET}@h/v1"))], (r"eval\.judge", *CRED)),
]


def _main(cli: str):
    if cli == "judge":
        from eval.judge import main
    elif cli == "report":
        from eval.report import main
    elif cli == "generate":
        from eval.generate import main
    elif cli == "train":
        from launch.train import main
    else:
        from slurm.submit import main
    return main


@pytest.fixture(scope="module")
def judge_server():
    with FakeJudgeServer() as server:
        yield server
        assert server.chat_requests() == [], "a bad input reached the judge"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_failure_class_row(row: Row, judge_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "case"
    d.mkdir()
    argv = row.args(d, f"openai:{judge_server.model}@{judge_server.base_url}")
    before = snapshot(tmp_path)
    rc, text = run_main(_main(row.cli), argv)
    after = snapshot(tmp_path)
    assert rc == 2, f"exit status {rc}; output:\n{text[-2000:]}"
    for pattern in row.expect:
        assert re.search(pattern, text), f"{pattern!r} not in the message:\n{text[-2000:]}"
    assert SECRET not in text, f"the secret is echoed:\n{text[-2000:]}"
    assert before == after, f"files created or changed: {sorted(set(before) ^ set(after))[:10]}"


def test_the_table_covers_every_command():
    assert len(ROWS) >= 20 and {r.cli for r in ROWS} == {"judge", "report", "generate", "submit", "train"}


# ---------------------------------------------------------------- answers resumed by content
def test_a_changed_question_is_answered_again(tmp_path, capsys):
    from eval.generate import main as generate_main
    from eval.questions import digest
    from eval_helpers import make_tiny_llama

    model = make_tiny_llama(tmp_path / "model")
    questions = make_questions(categories=("writing", "stem", "math"))
    qfile = write_jsonl(tmp_path / "questions.jsonl", questions)
    argv = [str(model), "--out", str(tmp_path / "out"), "--questions", str(qfile), "--backend", "hf",
            "--max-new-tokens", "4", "--temperature", "0"]
    assert generate_main(argv) == 0
    path = tmp_path / "out" / "answers" / "model.jsonl"
    first = path.read_text().splitlines()
    assert [json.loads(l)["question_digest"] for l in first] == [digest(q["turns"]) for q in questions]

    # the reproduction: id 1 now holds another question
    questions[0]["turns"] = ["A different first question?", "And its follow-up?"]
    write_jsonl(qfile, questions)
    capsys.readouterr()
    assert generate_main(argv) == 0
    captured = capsys.readouterr()
    assert "1 question(s) changed since they were answered, answering them again: [1]" in captured.err
    assert "2 of 3 questions already answered" in captured.out
    again = path.read_text().splitlines()
    assert again[1:] == first[1:], "answers to unchanged questions were rewritten"
    assert json.loads(again[0])["question_digest"] == digest(questions[0]["turns"])

    # a third run with the same questions changes nothing and answers nothing
    assert generate_main(argv) == 0
    assert path.read_text().splitlines() == again
    assert "3 of 3 questions already answered" in capsys.readouterr().out


# ---------------------------------------------------------------- a request bounded as a whole
@pytest.mark.parametrize("mode", ["body", "headers"])
def test_a_dripping_server_cannot_hold_a_judge_call(mode):
    """Through the real openai client: with a 1 s timeout and 2 attempts, a server that sends a byte every 0.2 s
    (each read well inside the timeout; without a whole-request bound, unbounded) ends the call in ~2 s."""
    from eval.judging.api_client import OpenAIJudge, RetrySettings
    from eval.judging.spec import JudgeSpec

    with DripServer(mode=mode, interval=0.2, max_seconds=30) as server:
        judge = OpenAIJudge(JudgeSpec("openai", server.model, server.base_url), None,
                            RetrySettings(timeout=1.0, max_attempts=2, backoff=0.1))
        started = time.monotonic()
        result = judge.complete([{"role": "user", "content": "grade this"}], 0.0, 16, 0)
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 10
        while len(server.dripped_for) < 2 and time.monotonic() < deadline:  # the server notices the client left
            time.sleep(0.05)
    assert result.text is None and result.reason == "timeout" and result.retryable
    assert result.attempts == 2 and server.connections == 2
    # each attempt held its connection for about the 1 s timeout; the server would have dripped for 30 s
    assert len(server.dripped_for) == 2 and max(server.dripped_for) < 2.5, server.dripped_for
    assert elapsed < 8, f"the call took {elapsed:.1f} s"  # 2 attempts of 1 s, a backoff wait, slack for load


def test_eval_judge_against_a_dripping_endpoint_ends_and_records_timeouts(tmp_path):
    """The reproduction through the command line: every call times out within the bound, is recorded as a
    retryable timeout, and the exit status says the run failed."""
    from eval.judge import main as judge_main

    root = make_run(tmp_path / "run", questions=make_questions(categories=("writing", "stem")))
    with DripServer(mode="body", interval=0.2, max_seconds=30) as server:
        started = time.monotonic()
        rc = judge_main([str(root), "--judge", f"openai:{server.model}@{server.base_url}", "--questions",
                         str(root / "questions.jsonl"), "--request-timeout", "1", "--max-attempts", "1",
                         "--concurrency", "4"])
        elapsed = time.monotonic() - started
    assert rc == 1 and elapsed < 10, (rc, elapsed)
    rows = [json.loads(l) for l in (root / "judgments" / f"{server.model}_single.jsonl").read_text().splitlines()]
    failures = [c["failure"] for r in rows for c in r["calls"]["single"]]
    assert len(failures) == 4 and all(f["reason"] == "timeout" and f["retryable"] for f in failures)


# ---------------------------------------------------------------- credentials never stored
def test_a_stored_spec_with_a_credential_is_redacted_in_reports(tmp_path):
    """An older judgments file may hold a credentialed spec: report.json and report.md show it redacted."""
    from eval.report import main as report_main

    root = _judged_run(tmp_path)
    path = root / "judgments" / "fake-judge_single.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    write_jsonl(path, [r | {"judge_spec": f"openai:fake-judge@http://user:{SECRET}@h/v1?api_key={SECRET}"}
                       for r in rows])
    assert report_main([str(root)]) == 0
    for name in ("report.json", "report.md"):
        text = (root / name).read_text()
        assert SECRET not in text and "http://***@h/v1?api_key=***" in text, name


def test_no_secret_in_files_or_argv_of_a_judged_run(tmp_path):
    """The key comes from the environment: after a real eval.judge run (a subprocess) with the key set, no file
    under the run directory and no argument of the process holds it."""
    root = make_run(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", JUDGE_KEY=SECRET, HF_HUB_OFFLINE="1")
    with FakeJudgeServer() as server:
        argv = [sys.executable, "-m", "eval.judge", str(root), "--judge", f"openai:{server.model}@{server.base_url}",
                "--questions", str(root / "questions.jsonl"), "--api-key-env", "JUDGE_KEY"]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        auths = {r.auth for r in server.chat_requests()}
    assert done.returncode == 0, done.stderr[-2000:]
    assert auths == {f"Bearer {SECRET}"}  # the key did reach the judge, through the environment
    assert SECRET not in " ".join(argv) + done.stdout + done.stderr
    leaked = [p for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


# ---------------------------------------------------------------- two writers, one judgments file
class _BothJudgesServer(FakeJudgeServer):
    """Answers no request until requests for both models have arrived: the two judge processes are then in flight
    at the same time however late either starts (bounded: after 120 s it answers anyway and the test fails on the
    overlap check)."""

    def respond(self, body, auth=""):
        prompt = "\n".join(m.get("content", "") for m in body.get("messages", []))
        with self._lock:
            self.senders = getattr(self, "senders", set()) | {m for m in ("model-a", "model-b") if f"by {m}" in prompt}
            both = self.__dict__.setdefault("both", threading.Event())
            if len(self.senders) == 2:
                both.set()
        both.wait(timeout=120)
        return super().respond(body, auth)


def test_two_judges_on_one_run_directory_keep_both_models_rows(tmp_path):
    """Two real eval.judge processes grade two models into the same judgments file at the same time; both exit 0
    and the file holds every row of both, once. The judge's request log shows that the two runs overlapped."""
    questions = make_questions(n_per_category=2)
    root = make_run(tmp_path / "run", model_id="model-a", questions=questions, extra=lambda q, t: "by model-a")
    make_run(root, model_id="model-b", questions=questions, extra=lambda q, t: "by model-b")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", HF_HUB_OFFLINE="1")
    with _BothJudgesServer(delay_s=0.05) as server:
        procs = [subprocess.Popen([sys.executable, "-m", "eval.judge", str(root), "--judge",
                                   f"openai:{server.model}@{server.base_url}", "--questions",
                                   str(root / "questions.jsonl"), "--model-id", model, "--concurrency", "2"],
                                  cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for model in ("model-a", "model-b")]
        outputs = []
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=180)[0])
            finally:
                p.kill()
        senders = ["a" if "by model-a" in r.prompt else "b" for r in server.chat_requests()]
    assert [p.returncode for p in procs] == [0, 0], outputs
    span = {m: (senders.index(m), len(senders) - 1 - senders[::-1].index(m)) for m in "ab"}
    assert span["a"][0] < span["b"][1] and span["b"][0] < span["a"][1], \
        f"the two judges did not overlap: {''.join(senders)}"
    rows = [json.loads(l) for l in (root / "judgments" / f"{server.model}_single.jsonl").read_text().splitlines()]
    keys = [(r["model"], r["question_id"], r["turn"]) for r in rows]
    expected = {(m, q["question_id"], t) for m in ("model-a", "model-b") for q in questions for t in (1, 2)}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert len(senders) == len(expected)  # each item judged once: no row was lost and judged again


def test_the_bounded_transport_keeps_the_environment_proxy(monkeypatch):
    """A transport given to the HTTP client turns off its proxy settings from the environment; the deadline
    transport takes them over for the judge's URL (NO_PROXY respected)."""
    from eval.judging.deadline import environment_proxy

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "internal.example")
    assert environment_proxy("https://api.openai.com/v1") == "http://proxy.example:3128"
    assert environment_proxy("https://internal.example/v1") is None
    assert environment_proxy("http://127.0.0.1:8000/v1") is None  # no http_proxy set


def test_slurm_jobs_name_the_key_variable_and_never_hold_the_key(tmp_path, monkeypatch):
    """slurm.submit with the key in the environment: the stored recipe names the variable (eval.api_key_env), and
    no job script or other written file holds the key (the jobs inherit the variable)."""
    from slurm.submit import main as submit_main

    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    recipe = _recipe(tmp_path, judge="openai:gpt-4o@https://api.example.com/v1", api_key_env="MY_JUDGE_KEY")
    rc, text = run_main(submit_main, [str(recipe), "--nodes", "1", "--gpus-per-node", "0", "--dry-run"])
    assert rc == 0, text[-2000:]
    stored = yaml.safe_load((tmp_path / "out" / "slurm" / "recipe.yaml").read_text())
    assert stored["eval"]["api_key_env"] == "MY_JUDGE_KEY"
    assert "eval.judge" in (tmp_path / "out" / "slurm" / "judge.sbatch").read_text()
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked and SECRET not in text, leaked


def test_eval_judge_reads_the_key_variable_named_by_the_recipe(tmp_path, monkeypatch):
    from eval.judge import main as judge_main
    from launch.recipe import Recipe

    root = make_run(tmp_path / "run")
    with FakeJudgeServer() as server:
        recipe = Recipe(name="tuned", run_dir=str(root))
        recipe.eval.judge = f"openai:{server.model}@{server.base_url}"
        recipe.eval.questions = str(root / "questions.jsonl")
        recipe.eval.api_key_env = "RECIPE_JUDGE_KEY"
        recipe.dump(root / "recipe.yaml")
        monkeypatch.setenv("RECIPE_JUDGE_KEY", SECRET)
        rc, text = run_main(judge_main, [str(root)])
        auths = {r.auth for r in server.chat_requests()}
    assert rc == 0, text[-2000:]
    assert auths == {f"Bearer {SECRET}"}
    assert not [p for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
