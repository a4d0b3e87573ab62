"""eval.report on canned judgments: means, bootstrap intervals, failures, seed, paired comparison, bad input."""

import json

import numpy as np
import pytest

from eval.report import main as report_main
from eval.stats import bootstrap_mean
from eval_helpers import make_answers, write_jsonl


def _row(model, qid, turn, category, score, reason=None, judge="judge-x"):
    call = {"value": score, "judgment": f"[[{score}]]", "attempts": 1}
    if reason:
        call = {"value": None, "judgment": None, "attempts": 3,
                "failure": {"reason": reason, "detail": "", "retryable": True}}
    return {"question_id": qid, "model": model, "model_b": None, "turn": turn, "category": category,
            "prompt": "sspeft-single" if turn == 1 else "sspeft-single-multi", "kind": "single",
            "judge": judge, "judge_spec": f"openai:{judge}@http://127.0.0.1:1/v1", "prompts_source": "builtin",
            "samples": 1, "judge_temperature": 0.0, "seed": 0, "score": None if reason else score,
            "calls": {"single": [call]}}


SCORES = {  # (qid, category): (turn1, turn2)
    (1, "writing"): (8, 6), (2, "writing"): (6, 4), (3, "math"): (3, 2), (4, "math"): (5, None), (5, "stem"): (9, 7)}


def _canned(root, model="tuned", shift=0.0, judge="judge-x", answers_for=None):
    rows = []
    for (qid, cat), (t1, t2) in SCORES.items():
        rows.append(_row(model, qid, 1, cat, t1 + shift, judge=judge))
        rows.append(_row(model, qid, 2, cat, t2 + shift if t2 is not None else None,
                         reason="timeout" if t2 is None else None, judge=judge))
    write_jsonl(root / "judgments" / f"{judge}_single.jsonl", rows)
    qs = [{"question_id": q, "category": c, "turns": ["a", "b"]} for q, c in (answers_for or SCORES)]
    write_jsonl(root / "answers" / f"{model}.jsonl", make_answers(model, qs))
    return root


def test_report_figures(tmp_path):
    root = _canned(tmp_path / "run", answers_for=list(SCORES) + [(6, "stem")])
    assert report_main([str(root), "--seed", "7", "--resamples", "500"]) == 0
    rep = json.loads((root / "report.json").read_text())
    assert set(rep) >= {"overall", "categories", "failures", "judge", "prompts", "seed"}
    assert rep["seed"] == 7 and rep["resamples"] == 500 and rep["model"] == "tuned"
    assert rep["judge"]["id"] == "judge-x" and rep["prompts"]["source"] == "builtin"
    ov = rep["overall"]
    assert ov["turn1"]["mean"] == pytest.approx(np.mean([8, 6, 3, 5, 9]), abs=1e-4) and ov["turn1"]["n"] == 5
    assert ov["turn2"]["mean"] == pytest.approx(np.mean([6, 4, 2, 7]), abs=1e-4) and ov["turn2"]["n"] == 4
    assert ov["all"]["mean"] == pytest.approx(np.mean([8, 6, 3, 5, 9, 6, 4, 2, 7]), abs=1e-4) and ov["all"]["n"] == 9
    for block in [ov] + list(rep["categories"].values()):
        for est in block.values():
            lo, hi = est["ci95"]
            assert lo <= est["mean"] <= hi
    assert rep["categories"]["writing"]["all"]["mean"] == 6.0
    assert rep["categories"]["math"]["turn2"] == {"mean": 2.0, "ci95": [2.0, 2.0], "n": 1}
    assert rep["categories"]["stem"]["turn1"]["ci95"] == [9.0, 9.0]  # one question: no spread
    assert list(rep["categories"]) == ["writing", "math", "stem"]  # MT-Bench order
    # the timed-out judgment and the unjudged question 6 (two turns) are counted, not scored
    assert rep["failures"] == {"total": 3, "by_reason": {"not_judged": 2, "timeout": 1}}
    md = (root / "report.md").read_text()
    assert "| writing | 7.00" in md and "timeout: 1" in md
    assert (root / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same seed gives the same figures; another seed other intervals
    first = (root / "report.json").read_text()
    assert report_main([str(root), "--seed", "7", "--resamples", "500"]) == 0
    assert (root / "report.json").read_text() == first
    assert report_main([str(root), "--seed", "8", "--resamples", "500"]) == 0
    assert json.loads((root / "report.json").read_text())["overall"]["all"]["ci95"] != ov["all"]["ci95"]


def test_bootstrap_interval_matches_resampling_by_question():
    groups = {1: [8.0, 6.0], 2: [6.0, 4.0], 3: [3.0, 2.0], 4: [5.0], 5: [9.0, 7.0]}
    est = bootstrap_mean(groups, seed=3, name="x", resamples=4000)
    rng = np.random.default_rng(0)
    keys = list(groups)
    means = []
    for _ in range(4000):
        pick = rng.choice(keys, size=len(keys))
        vals = [v for k in pick for v in groups[k]]
        means.append(np.mean(vals))
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert est.n == 9 and est.mean == pytest.approx(50 / 9, abs=1e-4)
    assert est.ci95[0] == pytest.approx(lo, abs=0.25) and est.ci95[1] == pytest.approx(hi, abs=0.25)


def test_comparison_paired(tmp_path):
    run = tmp_path / "run"
    _canned(run / "baseline", model="run-baseline")
    _canned(run, model="run", shift=1.0)
    assert report_main([str(run / "baseline"), str(run), "--model-id", "run-baseline", "--model-id", "run",
                        "--resamples", "300"]) == 0
    cmp = json.loads((run / "comparison" / "comparison.json").read_text())
    assert cmp["baseline"] == "run-baseline" and cmp["resamples"] == 300
    res = cmp["models"]["run"]
    assert res["overall"]["all"]["delta"] == 1.0 and res["overall"]["all"]["ci95"] == [1.0, 1.0]
    assert res["overall"]["all"]["n"] == 9
    assert res["categories"]["math"]["turn2"]["n"] == 1
    assert res["overall"]["all"]["mean"] - res["overall"]["all"]["baseline_mean"] == pytest.approx(1.0)
    assert (run / "report.json").is_file() and (run / "baseline" / "report.json").is_file()
    assert (run / "comparison" / "comparison.png").is_file()
    md = (run / "comparison" / "comparison.md").read_text()
    assert "+1.00 [+1.00, +1.00]" in md
    # the measured effect leads; the judge's scores follow under a heading that says how far they can be trusted
    assert md.index("## Measured effect: held-out response loss") < md.index("## Judge scores (judge agreement "
                                                                           "not measured)")
    assert cmp["judge_reliability"]["level"] == "unaudited" and "**Reliability:**" in md


def test_judge_reliability_levels():
    from eval.judge_reliability import judge_reliability

    assert judge_reliability("local:smollm2")["level"] == "not-a-quality-measure"
    assert judge_reliability("local:/cache/SmolLM2-135M-Instruct.Q4_1")["label"] == "tiny judge: not a quality measure"
    assert judge_reliability("openai:gpt-4o@https://api.openai.com/v1")["level"] == "unaudited"
    assert judge_reliability(None)["level"] == "unaudited"
    audit = {"sample": {"questions": [81, 82, 83]}, "position_consistency": {"value": 0.625, "n": 16},
             "repeat_weighted_kappa": {"value": None, "n": 0}, "label_agreement": {"label_kappa": {"value": 0.41}}}
    audited = judge_reliability("openai:gpt-4o@https://api.openai.com/v1", audit)
    assert audited["level"] == "audited"
    assert audited["label"] == "judge audited: position consistency 0.62, κ against labels 0.41"
    assert "on 3 of this run's questions" in audited["reason"]
    assert judge_reliability("local:smollm2", audit)["level"] == "not-a-quality-measure"  # an audit does not lift it
    # rows graded by several specs: the least reliable one decides
    assert judge_reliability(["serve:/models/qwen", "local:smollm2"])["level"] == "not-a-quality-measure"


def test_tiny_judge_report_leads_with_the_checkpoint(tmp_path):
    """report.md of a run judged by the demo's judge: the checkpoint paragraph first, then scores marked as not a
    quality measure."""
    from eval.report_files import report_markdown

    root = _canned(tmp_path / "run", judge="smollm2")
    path = root / "judgments" / "smollm2_single.jsonl"
    path.write_text(path.read_text().replace("openai:smollm2@http://127.0.0.1:1/v1", "local:smollm2"))
    assert report_main([str(root), "--resamples", "200"]) == 0
    rep = json.loads((root / "report.json").read_text())
    assert rep["judge"]["reliability"]["level"] == "not-a-quality-measure"
    md = report_markdown(rep, effect="Checkpoint: merged in fp32. Response loss on the run's 3 held-out records: 1.5.")
    assert md.index("## Checkpoint and held-out response loss") < md.index("held-out records: 1.5") < md.index(
        "## Judge scores (tiny judge: not a quality measure)") < md.index("| **overall** |")


def test_report_bad_input(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert report_main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "no judgments in" in err and "python -m eval.judge" in err
    _canned(tmp_path / "a", model="a", judge="judge-x")
    _canned(tmp_path / "b", model="b", judge="judge-y")
    assert report_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 2
    assert "different judges" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "a" / "report.json").exists()
    assert report_main([str(tmp_path / "a"), "--resamples", "10"]) == 2
    assert report_main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a")]) == 2


def test_superseded_judgment_rows_count_once(tmp_path):
    """Until the judge compacts its file, a key can have an earlier row and a later one that supersedes it: the
    report scores the latest row only (the canned figures, not a mix with the stale score)."""
    root = _canned(tmp_path / "run")
    path = root / "judgments" / "judge-x_single.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    stale = _row("tuned", 1, 1, "writing", 1)
    path.write_text("\n".join(json.dumps(r) for r in [stale] + rows) + "\n")
    assert report_main([str(root), "--seed", "7", "--resamples", "200"]) == 0
    ov = json.loads((root / "report.json").read_text())["overall"]
    assert ov["turn1"]["n"] == 5 and ov["turn1"]["mean"] == pytest.approx(np.mean([8, 6, 3, 5, 9]), abs=1e-4)
