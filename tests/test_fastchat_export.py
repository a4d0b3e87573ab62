"""`eval.report --fastchat DIR`: judgments from a real judging run (local fake OpenAI endpoint) exported as the rows
FastChat's llm_judge writes, read back by FastChat's own `show_result` when `fschat` is importable, and checked
field by field against what FastChat's readers use otherwise."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest

from eval.judge import main as judge_main
from eval.report import main as report_main
from eval_helpers import FakeJudgeServer, make_answers, make_questions, make_run, write_jsonl

FAST = ["--backoff", "0.01", "--request-timeout", "0.5", "--max-attempts", "2"]
BASE_RATES = {1: 3, 2: 9, 3: 6, 4: 6}  # the tuned model rates 6: it wins q1, loses q2, ties q3 and q4
# FastChat's pairwise rows (fastchat/llm_judge/common.py play_a_match_pair); show_result reads model_1, model_2,
# g1_winner, g2_winner; load_pairwise_model_judgments also reads judge, question_id, g1_judgment, g2_judgment
PAIR_FIELDS = {"question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_user_prompt",
               "g1_judgment", "g2_user_prompt", "g2_judgment", "turn", "tstamp"}
# FastChat's single rows (play_a_match_single); show_result --mode single reads model, score, turn
SINGLE_FIELDS = {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A judged run (single and pairwise; question 4 turn 2 fails with HTTP 400) and its FastChat export."""
    tmp = tmp_path_factory.mktemp("fastchat")
    qs = make_questions(categories=("writing", "math", "stem", "humanities"))
    root = make_run(tmp / "run", questions=qs, rate=lambda q, t: 6,
                    extra=lambda q, t: "FAIL=400" if (q, t) == (4, 2) else "")
    other = write_jsonl(tmp / "base.jsonl", make_answers("base", qs, rate=lambda q, t: BASE_RATES[q]))
    with FakeJudgeServer() as server:
        judge = ["--judge", f"openai:{server.model}@{server.base_url}", "--questions", str(root / "questions.jsonl"),
                 "--max-failure-rate", "0.5", *FAST]
        assert judge_main([str(root), *judge, "--against", str(other)]) == 0
        assert judge_main([str(root), *judge]) == 0
    out = tmp / "fastchat"
    assert report_main([str(root), "--resamples", "200", "--fastchat", str(out)]) == 0
    return root, out


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairwise_rows_are_fastchats(exported):
    root, out = exported
    rows = {(r["question_id"], r["turn"]): r for r in _lines(out / "model_judgment" / "fake-judge_pair.jsonl")}
    assert len(rows) == 8 and all(set(r) == PAIR_FIELDS for r in rows.values())
    assert all((r["model_1"], r["model_2"]) == ("tuned", "base") for r in rows.values())
    winners = {k: (r["g1_winner"], r["g2_winner"]) for k, r in rows.items()}
    assert winners == {(1, 1): ("model_1",) * 2, (1, 2): ("model_1",) * 2, (2, 1): ("model_2",) * 2,
                       (2, 2): ("model_2",) * 2, (3, 1): ("tie",) * 2, (3, 2): ("tie",) * 2, (4, 1): ("tie",) * 2,
                       (4, 2): ("error",) * 2}
    assert rows[(1, 1)]["judge"][0] == "fake-judge" and "[[A]]" in rows[(1, 1)]["g1_judgment"]
    # our own file keeps the honest failure record
    ours = {(r["question_id"], r["turn"]): r for r in _lines(root / "judgments" / "fake-judge_pair.jsonl")}
    assert ours[(4, 2)]["outcome"] is None
    assert ours[(4, 2)]["calls"]["AB"][0]["failure"]["reason"]


def test_single_rows_are_fastchats(exported):
    root, out = exported
    rows = {(r["question_id"], r["turn"]): r for r in _lines(out / "model_judgment" / "fake-judge_single.jsonl")}
    assert len(rows) == 8 and all(set(r) == SINGLE_FIELDS for r in rows.values())
    assert rows[(4, 2)]["score"] == -1 and all(r["score"] == 6 for k, r in rows.items() if k != (4, 2))
    ours = {(r["question_id"], r["turn"]): r for r in _lines(root / "judgments" / "fake-judge_single.jsonl")}
    assert ours[(4, 2)]["score"] is None
    assert (out / "model_answer" / "tuned.jsonl").read_text() == (root / "answers" / "tuned.jsonl").read_text()


def _show(func, **args) -> str:
    namespace = argparse.Namespace(bench_name="mt_bench", judge_model="fake-judge", model_list=None, **args)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        func(namespace)
    return buffer.getvalue()


def test_fastchats_show_result_reads_the_export(exported):
    from conftest import require_module

    require_module("fastchat")  # installed by `make` (no dependencies); missing under CI=true is a failure
    import fastchat.llm_judge.show_result as show_result
    root, out = exported
    table = _show(show_result.display_result_pairwise, mode="pairwise-baseline", baseline_model="base",
                  input_file=str(out / "model_judgment" / "fake-judge_pair.jsonl"))
    tuned = next(line.split() for line in table.splitlines() if line.startswith("tuned"))
    ours = json.loads((root / "report.json").read_text())["pairwise"]["base"]
    assert [int(x) for x in tuned[1:4]] == [ours["win"], ours["loss"], ours["tie"]] == [2, 2, 3]
    single = _show(show_result.display_result_single,
                   input_file=str(out / "model_judgment" / "fake-judge_single.jsonl"))
    assert "tuned" in single and "6.0" in single  # the failed judgment (-1) is left out, as FastChat does
