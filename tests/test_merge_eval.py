"""Evaluation reads launch.merge's report: a lossy checkpoint is refused, and report/comparison carry the merged
dtype, the ΔW kept, the probe's agreement and the held-out response losses."""

import json
import shutil

import pytest

from eval.common import EvalError
from eval.generate import main as generate_main
from eval.target import check_merge_report
from eval.report import main as report_main
from eval_helpers import make_answers, make_questions, make_tiny_llama, write_jsonl

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _merge_report(adapter, dtype="fp32", lossy=False, heldout=2.5):
    """The fields launch.merge writes (see tests/test_launch_merge.py for the figures themselves)."""
    report = {"adapter": adapter, "dtype": dtype, "dtype_requested": "auto", "max_delta_loss": 0.01,
              "lossy": lossy, "heldout": {"loss": heldout, "records": 10, "tokens": 120},
              "probe": {"cosine": 0.99999, "residual": 1e-5, "max_abs_logit_diff": 2e-6, "passed": not lossy}}
    if adapter:
        report |= {"delta_lost_to_rounding": 1e-8, "delta_lost_worst_layer": 2e-8,
                   "delta_loss": {"bf16": {"worst": 0.4}, "fp16": {"worst": 0.05}, "fp32": {"worst": 2e-8}}}
    return report


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _run(root, tiny, report):
    from launch.recipe import Recipe

    questions = write_jsonl(root.parent / "questions.jsonl", make_questions(categories=("writing", "math")))
    recipe = Recipe(name="tiny", run_dir=str(root))
    recipe.eval.questions, recipe.eval.limit, recipe.eval.max_new_tokens = str(questions), 1, 2
    recipe.eval.backend = "hf"
    recipe.dump(root / "recipe.yaml")
    (root / "template.jinja").write_text(TEMPLATE)
    shutil.copytree(tiny, root / "merged")
    (root / "merged" / "merge_report.json").write_text(json.dumps(report))
    return root


def test_generate_refuses_a_lossy_checkpoint(tmp_path, tiny, capsys):
    run = _run(tmp_path / "run", tiny, _merge_report("adapter", dtype="bf16", lossy=True))
    assert generate_main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "marked lossy" in err and "--allow-lossy" in err
    assert not (run / "answers").exists()
    assert generate_main([str(run), "--allow-lossy"]) == 0
    assert (run / "answers" / "tiny.jsonl").is_file()


def test_generate_refuses_a_dtype_that_would_round_delta_away(tmp_path, tiny):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "merge_report.json").write_text(json.dumps(_merge_report("adapter")))
    with pytest.raises(EvalError, match=r"--dtype bf16 rounds .* 40.00% of the worst layer's ΔW"):
        check_merge_report(merged, "bf16", allow_lossy=False)
    check_merge_report(merged, "fp32", allow_lossy=False)
    check_merge_report(merged, "auto", allow_lossy=False)
    check_merge_report(merged, "bf16", allow_lossy=True)
    check_merge_report(tmp_path, "bf16", allow_lossy=False)  # not made by launch.merge: nothing to check


def _judgments(root, model, scores):
    rows = [{"question_id": q, "model": model, "model_b": None, "turn": 1, "category": "writing",
             "prompt": "sspeft-single", "kind": "single", "judge": "j", "judge_spec": "local:j",
             "prompts_source": "builtin", "samples": 1, "judge_temperature": 0.0, "seed": 0, "score": s,
             "calls": {"single": [{"value": s, "judgment": f"[[{s}]]", "attempts": 1}]}}
            for q, s in enumerate(scores, 1)]
    write_jsonl(root / "judgments" / "j_single.jsonl", rows)
    write_jsonl(root / "answers" / f"{model}.jsonl",
                make_answers(model, [{"question_id": q, "category": "writing", "turns": ["a"]}
                                     for q in range(1, len(scores) + 1)]))


def test_report_and_comparison_carry_the_checkpoint(tmp_path, tiny):
    run = _run(tmp_path / "run", tiny, _merge_report("adapter", heldout=2.25))
    base = run / "baseline"
    (base / "merged").mkdir(parents=True)
    (base / "merged" / "merge_report.json").write_text(json.dumps(_merge_report(None, heldout=2.75)))
    _judgments(run, "tiny", [1, 1, 1])
    _judgments(base, "tiny-baseline", [1, 1, 1])
    assert report_main([str(base), str(run), "--resamples", "200"]) == 0
    tuned = json.loads((run / "report.json").read_text())["checkpoint"]
    assert tuned["dtype"] == "fp32" and tuned["heldout_loss"] == 2.25 and tuned["probe"]["cosine"] == 0.99999
    assert tuned["delta_lost_worst_layer"] == 2e-8 and tuned["lossy"] is False
    md = (run / "report.md").read_text()
    assert "merged in fp32 (asked: auto)" in md and "cosine 0.99999, residual 1e-05" in md and "2.2500" in md
    assert "the base without ΔW, merged in fp32" in (base / "report.md").read_text()
    cmp = json.loads((run / "comparison" / "comparison.json").read_text())
    held = cmp["models"]["tiny"]["heldout_loss"]
    assert held == {"baseline": 2.75, "model": 2.25, "delta": -0.5, "records": 10}
    assert cmp["models"]["tiny"]["overall"]["all"]["delta"] == 0.0  # the judge sees no difference ...
    assert "| tiny | 2.7500 | 2.2500 | -0.5000 | 10 |" in (run / "comparison" / "comparison.md").read_text()
