"""eval.judge against a local OpenAI-compatible server that injects failures (HTTP 500/400/429, timeouts, garbage
bodies, unparseable ratings): retries, failure accounting, exit status, resume, pairwise, bad input."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.judge import main as judge_main
from eval.report import main as report_main
from eval_helpers import FakeJudgeServer, make_answers, make_questions, make_run, write_jsonl

REPO = Path(__file__).resolve().parents[1]
FAST = ["--backoff", "0.01", "--request-timeout", "0.5", "--max-attempts", "3"]


def _judge(root, server, *extra):
    return judge_main([str(root), "--judge", f"openai:{server.model}@{server.base_url}",
                       "--questions", str(root / "questions.jsonl"), *FAST, *extra])


def _rows(root, judge="fake-judge", kind="single"):
    path = root / "judgments" / f"{judge}_{kind}.jsonl"
    return {(r["question_id"], r["turn"]): r for r in map(json.loads, path.read_text().splitlines())}


FAILURES = {1: "FAIL=500x2", 2: "FAIL=503", 3: "FAIL=400", 4: "FAIL=sleep", 5: "FAIL=garbage", 6: "FAIL=two"}


@pytest.fixture
def failing_run(tmp_path):
    qs = make_questions(categories=("writing", "math", "coding", "stem", "humanities", "roleplay"))
    return make_run(tmp_path / "run", questions=qs, extra=lambda q, t: FAILURES[q] if t == 2 else "")


def test_retries_failure_counts_and_exit_status(failing_run, capsys):
    with FakeJudgeServer(sleep_s=1.0) as server:
        assert _judge(failing_run, server, "--concurrency", "4") == 1  # 5 of 12 failed > 0.2
        rows = _rows(failing_run)
        assert server.count("FAIL=500x2") == 3 and rows[(1, 2)]["score"] is not None
        assert rows[(1, 2)]["calls"]["single"][0]["attempts"] == 3
        expected = {(2, 2): ("http_503", 3), (3, 2): ("http_400", 1), (4, 2): ("timeout", 3),
                    (5, 2): ("bad_response", 1), (6, 2): ("ambiguous_rating", 1)}
        for key, (reason, attempts) in expected.items():
            call = rows[key]["calls"]["single"][0]
            assert rows[key]["score"] is None, key  # a failure is never a score
            assert call["failure"]["reason"] == reason and call["attempts"] == attempts, (key, call)
            assert server.count(FAILURES[key[0]]) == attempts
        assert all(rows[(q, 1)]["score"] is not None for q in range(1, 7))
        assert "5 failed" in capsys.readouterr().out
        before = len(server.chat_requests())

        # rerun with a looser threshold: only the transient failures (500, timeout) are tried again
        assert _judge(failing_run, server, "--max-failure-rate", "0.5") == 0
        again = server.chat_requests()[before:]
        assert sum("FAIL=503" in r.prompt for r in again) == 3 and sum("FAIL=sleep" in r.prompt for r in again) == 3
        assert len(again) == 6
        assert server.count("FAIL=400") == 1 and server.count("FAIL=garbage") == 1

    assert report_main([str(failing_run), "--resamples", "200"]) == 0
    report = json.loads((failing_run / "report.json").read_text())
    assert report["failures"] == {"total": 5, "by_reason": {"ambiguous_rating": 1, "bad_response": 1,
                                                            "http_400": 1, "http_503": 1, "timeout": 1}}
    assert report["overall"]["all"]["n"] == 7 and report["overall"]["turn1"]["n"] == 6


def test_rerun_makes_no_repeat_calls_and_rejudges_changed_answers(tmp_path):
    root = make_run(tmp_path / "run")
    with FakeJudgeServer() as server:
        assert _judge(root, server) == 0
        first = _rows(root)
        assert len(server.chat_requests()) == 8
        assert _judge(root, server) == 0
        assert len(server.chat_requests()) == 8  # nothing judged twice
        assert _rows(root) == first
        # a regenerated answer for question 2 makes its two items stale (turn 2's prompt holds turn 1)
        qs = [json.loads(l) for l in (root / "questions.jsonl").read_text().splitlines()]
        answers = make_answers("tuned", qs, rate=lambda q, t: 2 if q == 2 else 5 + (q + t) % 4)
        write_jsonl(root / "answers" / "tuned.jsonl", answers)
        assert _judge(root, server) == 0
        assert len(server.chat_requests()) == 10
        rows = _rows(root)
        assert rows[(2, 1)]["score"] == 2 and rows[(2, 2)]["score"] == 2 and rows[(1, 1)] == first[(1, 1)]
        assert len((root / "judgments" / "fake-judge_single.jsonl").read_text().splitlines()) == 8


def test_kill_during_judging_then_resume(tmp_path):
    qs = make_questions(n_per_category=3)
    root = make_run(tmp_path / "run", questions=qs)
    path = root / "judgments" / "fake-judge_single.jsonl"
    with FakeJudgeServer(delay_s=0.25) as server:
        cmd = [sys.executable, "-m", "eval.judge", str(root), "--judge", f"openai:fake-judge@{server.base_url}",
               "--questions", str(root / "questions.jsonl"), "--concurrency", "1", *FAST]
        log = tmp_path / "judge.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not path.exists() or len(path.read_text().splitlines()) < 4):
            assert proc.poll() is None, f"judge exited early:\n{log.read_text()}"
            time.sleep(0.05)
        assert path.exists(), f"no judgments after 60 s:\n{log.read_text()}"
        proc.kill()
        proc.wait(timeout=10)
        saved = {r.get("user_prompt") for r in map(json.loads, path.read_text().splitlines())}
        assert 4 <= len(saved) < 24
        first_run = len(server.chat_requests())

        server.delay_s = 0.0
        assert _judge(root, server) == 0
        rerun = server.chat_requests()[first_run:]
        # nothing whose judgment was saved is asked again; the rest (at most 1 was in flight) is asked once
        assert not any(any(p and p in r.prompt for p in saved) for r in rerun)
        assert len(rerun) == 24 - len(saved)
        rows = _rows(root)
        assert len(rows) == 24 and all(r["score"] is not None for r in rows.values())


def test_samples_median_and_sample_failures(tmp_path):
    root = make_run(tmp_path / "run", extra=lambda q, t: {1: "RATES=2,9,4", 2: "RATES=3,x,8"}.get(q, "") if t == 1
                    else "")
    with FakeJudgeServer() as server:
        assert _judge(root, server, "--samples", "3") == 2  # K > 1 needs a temperature
        assert server.chat_requests() == []
        assert _judge(root, server, "--samples", "3", "--judge-temperature", "0.7", "--concurrency", "1") == 0
        rows = _rows(root)
        assert rows[(1, 1)]["score"] == 4  # median of 2, 9, 4
        assert rows[(2, 1)]["score"] == 5.5  # median of the successful 3 and 8; the failure is kept
        assert [c["value"] for c in rows[(2, 1)]["calls"]["single"]] == [3, None, 8]
        seeds = {r.body["seed"] for r in server.chat_requests()}
        assert len(seeds) == len(server.chat_requests())  # every sample has its own seed
        assert all(r.body["temperature"] == 0.7 for r in server.chat_requests())


def test_missing_reference_is_an_error_before_any_call(tmp_path, capsys):
    qs = make_questions(categories=("writing", "math"))
    del qs[1]["reference"]
    root = make_run(tmp_path / "run", questions=qs)
    with FakeJudgeServer() as server:
        assert _judge(root, server) == 2
        assert "question 2 (math) turn 1: no reference answer" in capsys.readouterr().err
        assert server.chat_requests() == [] and not (root / "judgments").exists()
        refs = write_jsonl(tmp_path / "refs.jsonl", [{"question_id": 2, "model_id": "ref",
                                                      "choices": [{"index": 0, "turns": ["R1", "R2"]}]}])
        assert _judge(root, server, "--references", str(refs)) == 0
        math_prompts = [r.prompt for r in server.chat_requests() if "math question" in r.prompt]
        assert len(math_prompts) == 2 and all("R1" in p for p in math_prompts)
        assert "R2" in next(p for p in math_prompts if "turn two" in p)


def test_unreachable_endpoint_fails_before_reading_answers(tmp_path, capsys):
    root = make_run(tmp_path / "run")
    (root / "answers" / "tuned.jsonl").write_text("this is not JSON\n")
    from launch.process import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    assert judge_main([str(root), "--judge", f"openai:m@{url}", "--questions", str(root / "questions.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and url in err and "not valid JSON" not in err
    with FakeJudgeServer() as server:
        assert judge_main([str(root), "--judge", f"openai:other@{server.base_url}",
                           "--questions", str(root / "questions.jsonl")]) == 2
        assert "does not serve model 'other'" in capsys.readouterr().err
        assert _judge(root, server) == 2  # now the answers are read, and are bad
        assert "not valid JSON" in capsys.readouterr().err
        assert server.chat_requests() == []


def test_api_key_from_environment_never_stored(tmp_path, capsys, monkeypatch):
    root = make_run(tmp_path / "run")
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    assert judge_main([str(root), "--judge", "openai:gpt-4o@https://judge.example.invalid/v1",
                       "--api-key-env", "MY_JUDGE_KEY", "--questions", str(root / "questions.jsonl")]) == 2
    assert "MY_JUDGE_KEY" in capsys.readouterr().err
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-secret-123")
    with FakeJudgeServer() as server:
        assert _judge(root, server, "--api-key-env", "MY_JUDGE_KEY") == 0
        assert {r.auth for r in server.chat_requests()} == {"Bearer sk-test-secret-123"}
    for path in root.rglob("*"):
        if path.is_file():
            assert "sk-test-secret" not in path.read_text(errors="replace"), path


def test_pairwise_in_both_orders(tmp_path):
    qs = make_questions(categories=("writing", "math", "stem"))
    root = make_run(tmp_path / "run", questions=qs, rate=lambda q, t: 6)
    # the other model is worse on q1, better on q2, equal on q3
    other = write_jsonl(tmp_path / "base.jsonl", make_answers("base", qs, rate=lambda q, t: {1: 3, 2: 9, 3: 6}[q]))
    with FakeJudgeServer() as server:
        assert _judge(root, server, "--against", str(other)) == 0
        assert len(server.chat_requests()) == 12  # 6 items x 2 orders
        rows = _rows(root, kind="pair")
        assert {k: r["outcome"] for k, r in rows.items()} == {
            (1, 1): "win", (1, 2): "win", (2, 1): "loss", (2, 2): "loss", (3, 1): "tie", (3, 2): "tie"}
        assert all(r["model_b"] == "base" and set(r["calls"]) == {"AB", "BA"} for r in rows.values())
        assert _judge(root, server) == 0  # single grading beside it, for the report
    assert report_main([str(root), "--resamples", "200"]) == 0
    report = json.loads((root / "report.json").read_text())
    assert report["pairwise"]["base"] == {"win": 2, "tie": 2, "loss": 2, "failed": 0, "win_rate": 0.5}


def test_real_mt_bench_with_fastchat_prompts(shared_dir, tmp_path, capsys):
    mt = shared_dir / "data" / "mt_bench"
    qs = [json.loads(l) for l in (mt / "question.jsonl").read_text().splitlines()]
    root = tmp_path / "run"
    write_jsonl(root / "answers" / "tuned.jsonl", make_answers("tuned", qs))
    base = [str(root), "--questions", str(mt / "question.jsonl"), "--judge-prompts", str(mt / "judge_prompts.jsonl")]
    with FakeJudgeServer() as server:
        # a generous timeout: 160 calls at concurrency 8 on a loaded machine must not time out and be retried
        spec = ["--judge", f"openai:fake-judge@{server.base_url}", *FAST, "--request-timeout", "30"]
        # q123 (coding) has no inline reference: an error before any call, naming it
        assert judge_main(base + spec) == 2
        assert "question 123 (coding) turn 1: no reference answer" in capsys.readouterr().err
        assert judge_main(base + spec + ["--references", str(mt / "reference_answer" / "gpt-4.jsonl"),
                                         "--concurrency", "8"]) == 0
        assert len(server.chat_requests()) == 160
    rows = _rows(root)
    assert len(rows) == 160 and all(r["score"] is not None for r in rows.values())
    assert rows[(101, 2)]["prompt"] == "single-math-v1-multi-turn" and rows[(81, 1)]["prompt"] == "single-v1"
    assert "[The Start of Reference Answer]" in rows[(111, 1)]["user_prompt"]


def test_bad_settings(tmp_path, capsys):
    root = make_run(tmp_path / "run")
    q = ["--questions", str(root / "questions.jsonl")]
    assert judge_main([str(root), "--judge", "openai:m@http://127.0.0.1:9/v1", "--max-failure-rate", "1.5"] + q) == 2
    assert "--max-failure-rate is 1.5" in capsys.readouterr().err
    assert judge_main([str(root), "--judge", "http://127.0.0.1:9/v1"] + q) == 2
    assert "needs a model name" in capsys.readouterr().err
    assert judge_main([str(tmp_path / "nowhere"), "--judge", "openai:m@http://127.0.0.1:9/v1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert judge_main([str(root), "--judge", "openai:m@http://127.0.0.1:9/v1", "--model-id", "x"] + q) == 2
    assert "answers there: ['tuned']" in capsys.readouterr().err


# ---------------------------------------------------------------- inputs and interruptions
def test_answers_beyond_the_limit_are_named_with_the_fix(tmp_path, capsys):
    """Answers generated with --limit 6, judged under limit 4: the message says what mismatches and what to do."""
    qs = make_questions(categories=("writing", "math", "coding", "stem", "humanities", "roleplay"))
    root = make_run(tmp_path / "run", questions=qs)
    with FakeJudgeServer() as server:
        assert _judge(root, server, "--limit", "4") == 2
        err = capsys.readouterr().err
        assert "holds answers to 2 question(s) [5, 6] beyond the first 4 that --limit selects" in err
        assert "--limit 6" in err and "questions file lacks" not in err
        assert server.chat_requests() == [] and not (root / "judgments").exists()
        # an id the questions file really lacks keeps its own message
        write_jsonl(root / "answers" / "tuned.jsonl", make_answers("tuned", qs + [dict(qs[0], question_id=99)]))
        assert _judge(root, server) == 2
        assert "question ids [99] that the questions file lacks" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["questions", "answers", "references", "judgments"])
def test_latin1_input_names_file_and_line(tmp_path, capsys, which):
    root = make_run(tmp_path / "run")
    path = {"questions": root / "questions.jsonl", "answers": root / "answers" / "tuned.jsonl",
            "references": tmp_path / "refs.jsonl", "judgments": root / "judgments" / "fake-judge_single.jsonl"}[which]
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_bytes().splitlines(keepends=True) if path.exists() else [b"{}\n"]
    lines.insert(1, json.dumps({"question_id": 1, "note": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    path.write_bytes(b"".join(lines))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    extra = ["--references", str(path)] if which == "references" else []
    with FakeJudgeServer() as server:
        assert _judge(root, server, *extra) == 2
        assert server.chat_requests() == []
    err = capsys.readouterr().err
    assert f"{which} file {path} line 2: byte 0xe9" in err and "expected UTF-8 text" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


class _ListBackend:
    """Answers each request at once with a rating and records the judgments file's lines after each call."""

    def __init__(self, path: Path, fail_after: int | None = None) -> None:
        self.path, self.fail_after, self.lines_seen = path, fail_after, []

    def run(self, requests, done):
        from eval.judging.calls import CallResult

        for i, _ in enumerate(requests):
            if self.fail_after is not None and i == self.fail_after:
                raise KeyboardInterrupt
            done(i, CallResult(f"Rating: [[{1 + i % 9}]]"))
            self.lines_seen.append(len(self.path.read_text().splitlines()))


def _engine(tmp_path, n_per_category=2):
    from eval.judging.engine import JudgmentStore, build_items
    from eval.judging.prompts import load_prompt_set
    from eval.questions import load_answers, load_questions

    root = make_run(tmp_path / "run", questions=make_questions(n_per_category=n_per_category))
    items = build_items(load_questions(root / "questions.jsonl"), load_answers(root / "answers" / "tuned.jsonl"),
                        "tuned", load_prompt_set(None), {})
    path = root / "judgments" / "j_single.jsonl"
    return items, path, lambda: JudgmentStore(path)


RUN = dict(samples=1, temperature=0.0, max_tokens=8, seed=0, meta={"judge": "j"})


def test_judgments_are_appended_per_call_and_compacted_at_the_end(tmp_path):
    from eval.judging.engine import run_judging

    items, path, store = _engine(tmp_path)
    backend = _ListBackend(path)
    summary = run_judging(items, store(), backend, **RUN)
    assert summary.calls == len(items) == 16 and summary.failed_calls == 0
    assert backend.lines_seen == list(range(1, 17))  # one line appended per returned call, nothing rewritten
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [(r["question_id"], r["turn"]) for r in rows] == [(i.question.question_id, i.turn) for i in items]


def test_ctrl_c_keeps_every_returned_call_and_a_torn_line_is_redone(tmp_path):
    from eval.judging.engine import run_judging

    items, path, store = _engine(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_judging(items, store(), _ListBackend(path, fail_after=5), **RUN)
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert len(rows) == 5 and all(r["score"] is not None for r in rows)  # compacted on the way out
    # a kill mid-append: a duplicate key (superseded) and a torn last line
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text) + text[0] + text[1][: len(text[1]) // 2])
    backend = _ListBackend(path)
    summary = run_judging(items, store(), backend, **RUN)
    assert summary.new_calls == 11 and summary.calls == 16  # the 5 intact rows reused, the torn one not needed
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [(r["question_id"], r["turn"]) for r in rows] == [(i.question.question_id, i.turn) for i in items]


def test_ctrl_c_stores_calls_that_returned(tmp_path):
    """SIGINT with calls in flight: every call the judge answered (and was paid for) is on disk."""
    import signal

    qs = make_questions(n_per_category=3)
    root = make_run(tmp_path / "run", questions=qs)
    path = root / "judgments" / "fake-judge_single.jsonl"
    with FakeJudgeServer(delay_s=0.5) as server:
        cmd = [sys.executable, "-m", "eval.judge", str(root), "--judge", f"openai:fake-judge@{server.base_url}",
               "--questions", str(root / "questions.jsonl"), "--concurrency", "4", "--backoff", "0.01",
               "--request-timeout", "5"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not path.exists() or len(path.read_text().splitlines()) < 4):
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130, out
        answered = {r.prompt for r in server.chat_requests()}
    stored = [json.loads(l)["user_prompt"] for l in path.read_text().splitlines()]
    assert len(stored) == len(answered) and all(any(s in p for p in answered) for s in stored)


def test_sigterm_exits_143_with_a_compact_judgments_file(tmp_path):
    """What timeout/kill/scancel send: the judge unwinds like on Ctrl-C (status 143) and the rerun finishes."""
    import signal

    root = make_run(tmp_path / "run", questions=make_questions(n_per_category=3))
    path = root / "judgments" / "fake-judge_single.jsonl"
    with FakeJudgeServer(delay_s=0.2) as server:
        cmd = [sys.executable, "-m", "eval.judge", str(root), "--judge", f"openai:fake-judge@{server.base_url}",
               "--questions", str(root / "questions.jsonl"), "--concurrency", "1", *FAST]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not path.exists() or len(path.read_text().splitlines()) < 3):
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 143 and "stopped by SIGTERM" in out, out
        rows = [json.loads(l) for l in path.read_text().splitlines()]
        keys = [(r["question_id"], r["turn"]) for r in rows]
        assert len(keys) == len(set(keys)) >= 3 and keys == sorted(keys)  # compacted on the way out
        server.delay_s = 0.0
        assert _judge(root, server) == 0
        assert len(_rows(root)) == 24
