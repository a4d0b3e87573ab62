"""eval.audit with scripted judges of known behaviour behind the local OpenAI-compatible server: each measured
figure is checked against the judge's known truth; κ against closed-form cases; label files read end to end;
eval.report's audit section and its --max-position-inconsistency / --min-kappa failures."""

import json
from itertools import product

import numpy as np
import pytest

from eval.audit import main as audit_main
from eval.auditing.agreement import cohen_kappa, spearman, weighted_kappa
from eval.judge import main as judge_main
from eval.report import main as report_main
from eval_helpers import FakeJudgeServer, always_first, by_length, make_answers, make_questions, make_run, \
    random_judge, write_jsonl

FAST = ["--backoff", "0.01", "--request-timeout", "5", "--max-attempts", "2"]
CATEGORIES = ("writing", "stem", "humanities", "roleplay")


def _rate(qid, turn):
    return 3 + (qid * 7 + turn) % 5


def _base_rate(qid, turn):
    return 5


@pytest.fixture
def runs(tmp_path):
    """A run (answers of varied length, RATE markers 3–7) and a baseline folder (RATE=5 everywhere)."""
    qs = make_questions(n_per_category=4, categories=CATEGORIES)
    root = make_run(tmp_path / "run", questions=qs, rate=_rate, extra=lambda q, t: "word " * (12 * (q % 6)))
    write_jsonl(tmp_path / "base" / "answers" / "base.jsonl", make_answers("base", qs, rate=_base_rate))
    return root, tmp_path / "base", qs


def _audit(root, server, *extra):
    return audit_main([str(root), *extra, "--judge", f"openai:{server.model}@{server.base_url}",
                       "--questions", str(root / "questions.jsonl"), *FAST])


def _figures(root, judge="fake-judge"):
    return json.loads((root / "audit" / judge / "audit.json").read_text())


def test_always_first_judge_has_full_first_position_preference(runs):
    root, base, _ = runs
    with FakeJudgeServer(script=always_first) as server:
        assert _audit(root, server, str(base), "--sample", "8") == 0
    a = _figures(root)
    assert a["first_position_preference"]["value"] == 1.0 and a["first_position_preference"]["n"] == 64
    assert a["position_consistency"]["value"] == 0.0  # every verdict flips with the order
    assert a["repeat_flip_rate"]["value"] == 0.0
    assert a["against"] == "base" and len(a["sample"]["questions"]) == 8


def test_length_judge_is_caught_by_correlation_and_padding(runs):
    root, _, _ = runs
    with FakeJudgeServer(script=by_length) as server:
        assert _audit(root, server, "--sample", "16") == 0
    a = _figures(root)
    corr, pad = a["length_score_correlation"], a["padding_score_change"]
    assert corr["value"] > 0.4 and corr["ci95"][0] > 0, corr
    # the padding adds ~120 characters per padded turn: one point per 100 characters, more on turn 2
    assert 1.0 <= pad["value"] <= 3.0 and pad["ci95"][0] > 0.5, pad
    assert a["position_consistency"]["value"] is None and "BASELINE_DIR" in a["position_consistency"]["note"]


def test_content_judge_ignores_padding(runs):
    root, _, _ = runs
    with FakeJudgeServer() as server:  # scores the RATE marker, whatever surrounds it
        assert _audit(root, server, "--sample", "6") == 0
    a = _figures(root)
    assert a["padding_score_change"]["value"] == 0.0 and a["padding_score_change"]["n"] == 12
    assert a["repeat_exact_agreement"]["value"] == 1.0 and a["repeat_weighted_kappa"]["value"] == 1.0


def _fastchat_labels(path, qs, model="tuned", other="base"):
    """FastChat human-judgment rows from the RATE truth, half of them with the models' sides swapped, two judges
    on question 1, and a row about other models that must not match."""
    rows = []
    for q, turn in product(qs, (1, 2)):
        qid = q["question_id"]
        mine, theirs = _rate(qid, turn), _base_rate(qid, turn)
        swap = qid % 2 == 0
        a, b = (other, model) if swap else (model, other)
        ra, rb = (theirs, mine) if swap else (mine, theirs)
        winner = "model_a" if ra > rb else "model_b" if rb > ra else ("tie (bothbad)" if qid % 3 else "tie")
        judges = ["expert_0", "author_1"] if qid == 1 else ["expert_0"]
        rows += [{"question_id": qid, "model_a": a, "model_b": b, "winner": winner, "judge": j, "turn": turn,
                  "conversation_a": [], "conversation_b": []} for j in judges]
    rows.append({"question_id": 1, "model_a": "gpt-4", "model_b": "claude-v1", "winner": "model_a",
                 "judge": "expert_3", "turn": 1})
    return write_jsonl(path, rows)


def test_perfect_judge_agrees_with_fastchat_labels_and_resumes(runs, tmp_path):
    root, base, qs = runs
    labels = _fastchat_labels(tmp_path / "human_judgments.jsonl", qs)
    with FakeJudgeServer() as server:
        assert _audit(root, server, str(base), "--labels", str(labels), "--sample", "100") == 0
        calls = len(server.chat_requests())
        assert calls == 16 * 2 * 2 * 2 + 16 * 2 * 2 * 2  # (single + padded) and (AB + BA), K = 2, 32 items each
        assert _audit(root, server, str(base), "--labels", str(labels), "--sample", "100") == 0
        assert len(server.chat_requests()) == calls  # every call reused from the audit's judgments file
    lab = _figures(root)["label_agreement"]
    assert lab["label_kappa"]["value"] == 1.0 and lab["label_agreement_with_ties"]["value"] == 1.0
    assert lab["label_agreement_without_ties"]["value"] == 1.0
    assert lab["labels_about_model"] == 34 and lab["labels_matched"] == 34  # two judges on question 1
    assert lab["labels_matched_share"] == 1.0
    assert _figures(root)["position_consistency"]["value"] == 1.0


def test_perfect_judge_agrees_with_single_score_labels(runs, tmp_path):
    root, _, qs = runs
    labels = write_jsonl(tmp_path / "scores.jsonl", [{"question_id": q["question_id"], "turn": t,
                                                      "score": _rate(q["question_id"], t), "model": "tuned"}
                                                     for q in qs[:6] for t in (1, 2)])
    with FakeJudgeServer() as server:
        assert _audit(root, server, "--labels", str(labels), "--sample", "4") == 0
    a = _figures(root)
    lab = a["label_agreement"]
    assert len(a["sample"]["questions"]) == 4 and set(a["sample"]["questions"]) <= {q["question_id"] for q in qs[:6]}
    assert lab["label_kappa"]["value"] == 1.0 and lab["label_weighted_kappa"]["value"] == 1.0
    assert lab["labels_matched"] == 8 and lab["labels_matched_share"] == round(8 / 12, 4)


def test_random_judge_kappa_is_zero_within_its_interval(tmp_path):
    qs = make_questions(n_per_category=8, categories=CATEGORIES)
    root = make_run(tmp_path / "run", questions=qs, rate=_rate)
    write_jsonl(tmp_path / "base" / "answers" / "base.jsonl", make_answers("base", qs, rate=_base_rate))
    labels = _fastchat_labels(tmp_path / "human.jsonl", qs)
    with FakeJudgeServer(script=random_judge) as server:
        assert _audit(root, server, str(tmp_path / "base"), "--labels", str(labels), "--sample", "32",
                      "--judge-temperature", "1") == 0
    a = _figures(root)
    for fig in (a["label_agreement"]["label_kappa"], a["repeat_weighted_kappa"]):
        assert abs(fig["value"]) < 0.3 and fig["ci95"][0] < 0 < fig["ci95"][1], fig
    assert 0.2 < a["position_consistency"]["value"] < 0.5  # by chance: 1/3 of order pairs agree
    assert a["judge"]["judge_temperature"] == 1.0


def test_report_shows_audit_and_fails_below_requirements(runs, capsys):
    root, base, _ = runs
    with FakeJudgeServer(script=always_first) as server:
        assert judge_main([str(root), "--judge", f"openai:{server.model}@{server.base_url}",
                           "--questions", str(root / "questions.jsonl"), *FAST]) == 0
        assert report_main([str(root), "--resamples", "200", "--max-position-inconsistency", "0.2"]) == 1
        assert "position consistency was not measured (not audited)" in capsys.readouterr().err
        assert "Judge audit: not audited" in (root / "report.md").read_text()
        assert _audit(root, server, str(base), "--sample", "4") == 0
    assert report_main([str(root), "--resamples", "200"]) == 0
    md = (root / "report.md").read_text()
    assert "first-position preference (decisive verdicts for the answer shown first): 1.00" in md
    assert json.loads((root / "report.json").read_text())["audit"]["position_consistency"]["value"] == 0.0
    capsys.readouterr()
    assert report_main([str(root), "--resamples", "200", "--max-position-inconsistency", "0.2",
                        "--min-kappa", "0.4"]) == 1
    err = capsys.readouterr().err
    assert "position inconsistency 1.00 is above --max-position-inconsistency 0.2" in err
    assert "--min-kappa 0.4: no κ was measured (κ undefined)" in err  # the judge gave 5 to everything
    # baseline and run: the run's pairwise audit speaks for the judge both were graded by
    with FakeJudgeServer(script=always_first) as server:
        assert judge_main([str(base), "--judge", f"openai:{server.model}@{server.base_url}",
                           "--questions", str(root / "questions.jsonl"), *FAST]) == 0
    assert report_main([str(base), str(root), "--resamples", "200", "--max-position-inconsistency", "0.2"]) == 1
    err = capsys.readouterr().err
    assert "tuned: position inconsistency 1.00" in err and "base:" not in err
    assert "Judge audit: not audited" in (base / "report.md").read_text()


def test_bad_input_is_refused_before_any_call(runs, tmp_path, capsys):
    root, base, _ = runs
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": 1, "model_a": "tuned", "model_b": "base",
                                                "winner": "model_a", "judge": "x", "turn": 1},
                                               {"question_id": 2, "model_a": "tuned", "model_b": "base",
                                                "winner": "A", "judge": "x", "turn": 1}])
    elsewhere = write_jsonl(tmp_path / "other.jsonl", [{"question_id": 1, "model_a": "gpt-4", "model_b": "base",
                                                        "winner": "tie", "judge": "x", "turn": 1}])
    with FakeJudgeServer() as server:
        assert _audit(root, server, str(base), "--labels", str(bad)) == 2
        assert "line 2: winner is 'A'; expected one of" in capsys.readouterr().err
        assert _audit(root, server, str(base), "--labels", str(elsewhere)) == 2
        assert "no label is about 'tuned' against 'base'" in capsys.readouterr().err
        assert _audit(root, server, "--samples", "1") == 2
        assert "at least 2 judgments per item" in capsys.readouterr().err
        assert _audit(root, server, "--sample", "0") == 2
        assert "--sample is 0" in capsys.readouterr().err
        assert server.chat_requests() == []
    assert not (root / "audit").exists()


# ---- statistics against closed-form and brute-force cases ----------------------------------------------------

def test_cohen_kappa_closed_form():
    # 2x2 table [[20, 5], [10, 15]]: p_o = 0.7, p_e = (25·30 + 25·20) / 50² = 0.5, κ = 0.4
    pairs = [("y", "y")] * 20 + [("y", "n")] * 5 + [("n", "y")] * 10 + [("n", "n")] * 15
    assert cohen_kappa(pairs) == pytest.approx(0.4)
    assert cohen_kappa([("a", "a"), ("b", "b")]) == 1.0
    assert cohen_kappa([("a", "a")] * 5) is None  # chance agreement is total: undefined, not 1


def test_weighted_kappa_matches_the_category_table_formula():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(1, 11, size=40)
        b = np.clip(a + rng.integers(-3, 4, size=40), 1, 10)
        cats = list(range(1, 11))
        observed = np.zeros((10, 10))
        for x, y in zip(a, b):
            observed[x - 1, y - 1] += 1
        expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
        w = np.array([[(i - j) ** 2 for j in cats] for i in cats], dtype=float)
        brute = 1 - (w * observed).sum() / (w * expected).sum()
        assert weighted_kappa(list(zip(a, b))) == pytest.approx(brute)
    assert weighted_kappa([(7, 7), (3, 3), (9, 9)]) == pytest.approx(1.0)


def test_spearman_with_ties():
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 2, 3, 4 → Pearson of the ranks
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    assert spearman([1, 2, 2, 5], [10, 20, 30, 40]) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert spearman([1, 2, 3], [5, 5, 5]) is None


def test_self_preference_warning(tmp_path):
    from eval.auditing.family import self_preference
    from eval.judging.spec import parse_judge_spec
    from eval.target import resolve_target

    smol = resolve_target("smollm2", str(tmp_path / "out"), None)
    same = self_preference(parse_judge_spec("local:smollm2"), smol)
    assert same["warning"] and "share the family smollm" in same["reasons"][0]
    assert not self_preference(parse_judge_spec("openai:gpt-4o@http://127.0.0.1:1/v1"), smol)["warning"]
    for name, kind in (("judge", "llama"), ("model", "llama"), ("other", "qwen2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": kind}))
    model = resolve_target(str(tmp_path / "model"), str(tmp_path / "out"), None)
    arch = self_preference(parse_judge_spec(f"local:{tmp_path / 'judge'}"), model)
    assert arch["reasons"] == ["judge and model have the same architecture (config model_type 'llama')"]
    assert not self_preference(parse_judge_spec(f"local:{tmp_path / 'other'}"), model)["warning"]
