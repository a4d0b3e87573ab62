"""eval.generate on a tiny real LLaMA (transformers backend) through a run directory, resume, bad input, and
the in-process judge constrained to a rating."""

import hashlib
import json
import shutil

import pytest

from eval.answers.chat_template import load_tokenizer, tokenize_chat
from eval.answers.generators import GenRequest, HFGenerator
from eval.generate import main as generate_main
from eval.judge import main as judge_main
from eval_helpers import make_questions, make_tiny_llama, write_jsonl

# differs from the tokenizer's own template, so using it is visible in the recorded hash
RUN_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _run_dir(root, tiny, merged=True):
    from launch.recipe import Recipe

    questions = write_jsonl(root.parent / "questions.jsonl", make_questions(categories=("writing", "math", "stem",
                                                                                          "coding")))
    recipe = Recipe(name="tiny", run_dir=str(root))
    recipe.eval.questions = str(questions)
    recipe.eval.limit = 3
    recipe.eval.max_new_tokens = 6
    recipe.eval.backend = "hf"
    recipe.dump(root / "recipe.yaml")
    (root / "template.jinja").write_text(RUN_TEMPLATE)
    if merged:
        shutil.copytree(tiny, root / "merged")
    return root


def test_generate_through_the_run_template_and_resume(tmp_path, tiny, capsys):
    run = _run_dir(tmp_path / "run", tiny)
    assert generate_main([str(run), "--temperature", "0"]) == 0
    path = run / "answers" / "tiny.jsonl"
    records = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [1, 2, 3]  # eval.limit = 3 from the recipe
    assert all(r["model_id"] == "tiny" and len(r["choices"][0]["turns"]) == 2 for r in records)
    meta = json.loads((run / "answers" / "tiny.meta.json").read_text())
    assert meta["template_sha256"] == hashlib.sha256(RUN_TEMPLATE.encode()).hexdigest()
    assert meta["backend"] == "hf" and meta["max_new_tokens"] == 6

    # turn 2 was answered with turn 1 and its answer in context, through the run's template
    tok = load_tokenizer(run / "merged", RUN_TEMPLATE)
    q = make_questions()[0]
    a1, a2 = records[0]["choices"][0]["turns"]
    conv = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": a1},
            {"role": "user", "content": q["turns"][1]}]
    gen = HFGenerator(run / "merged")
    assert gen.generate([GenRequest(tokenize_chat(tok, conv), 0.0, 6, 0)])[0].text.strip() == a2

    # a rerun with a larger limit answers only the new question and keeps the old answers as they were
    capsys.readouterr()
    assert generate_main([str(run), "--temperature", "0", "--limit", "4"]) == 0
    assert "3 of 4 questions already answered" in capsys.readouterr().out
    again = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["question_id"] for r in again] == [1, 2, 3, 4]
    assert again[:3] == records  # the earlier records, timestamps included, are kept as they were


def test_local_judge_constrained_to_a_rating(tmp_path, tiny):
    run = _run_dir(tmp_path / "run", tiny)
    assert generate_main([str(run), "--limit", "2"]) == 0
    assert judge_main([str(run), "--judge", f"local:{run / 'merged'}", "--local-backend", "hf",
                       "--judge-id", "tinyjudge"]) == 0
    rows = [json.loads(l) for l in (run / "judgments" / "tinyjudge_single.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:
        call = r["calls"]["single"][0]
        assert call["judgment"] == f"[[{int(r['score'])}]]" and 1 <= r["score"] <= 10


def test_generate_bad_input(tmp_path, tiny, capsys):
    run = _run_dir(tmp_path / "run", tiny, merged=False)
    assert generate_main([str(run)]) == 2
    assert f"`python -m launch.merge {run}`" in capsys.readouterr().err
    (run / "baseline").mkdir()
    assert generate_main([str(run / "baseline")]) == 2
    assert f"`python -m launch.merge {run} --no-adapter`" in capsys.readouterr().err

    assert generate_main([str(tiny)]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    out = tmp_path / "out"
    assert generate_main([str(tiny), "--out", str(out), "--questions", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl' does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "math", "turns": []}\n')
    assert generate_main([str(tiny), "--out", str(out), "--questions", str(bad)]) == 2
    assert "field 'turns' is []" in capsys.readouterr().err
    assert generate_main([str(tiny), "--out", str(out), "--max-new-tokens", "0"]) == 2
    assert not out.exists()  # nothing half-written
    assert generate_main([str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_and_baseline_end_to_end(tmp_path, tiny, capsys):
    """The demo's eval stages on a run directory laid out as launch.merge writes it (merged/, baseline/merged/)."""
    from eval.report import main as report_main

    run = _run_dir(tmp_path / "run", tiny)
    shutil.copytree(tiny, run / "baseline" / "merged")
    (run / "baseline" / "template.jinja").write_text(RUN_TEMPLATE)
    judge = ["--judge", f"local:{tiny}", "--judge-id", "tinyjudge"]
    for target in (run, run / "baseline"):
        assert generate_main([str(target), "--limit", "2"]) == 0
        assert judge_main([str(target), *judge]) == 0
    assert (run / "answers" / "tiny.jsonl").is_file() and (run / "baseline" / "answers" / "tiny-baseline.jsonl").is_file()
    assert report_main([str(run / "baseline"), str(run), "--resamples", "200"]) == 0
    cmp = json.loads((run / "comparison" / "comparison.json").read_text())
    assert cmp["baseline"] == "tiny-baseline" and cmp["models"]["tiny"]["overall"]["all"]["n"] == 4
    # the same weights, template and greedy judge: identical scores, a zero difference
    assert cmp["models"]["tiny"]["overall"]["all"]["delta"] == 0.0
    assert json.loads((run / "report.json").read_text())["model"] == "tiny"
