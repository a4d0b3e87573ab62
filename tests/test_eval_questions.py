"""Question, reference and answer files: the real MT-Bench files load; bad records fail with the field named."""

import json

import pytest

from eval.common import EvalError
from eval.judging.prompts import FASTCHAT_NAMES, builtin_prompts, load_prompt_set
from eval.questions import (CATEGORY_TEMPERATURE, DEFAULT_QUESTIONS, REFERENCE_CATEGORIES, answer_temperature,
                            load_answers, load_questions, load_references)


def test_real_mt_bench_questions(shared_dir):
    qs = load_questions(shared_dir / "data/mt_bench/question.jsonl", strict_categories=True)
    assert len(qs) == 80
    assert sum(bool(q.reference) for q in qs) == 39
    assert {q.category for q in qs} == set(CATEGORY_TEMPERATURE)
    assert all(len(q.turns) == 2 for q in qs)
    assert [q.question_id for q in load_questions(shared_dir / "data/mt_bench/question.jsonl", limit=3)] == [81, 82, 83]
    refs = load_references(shared_dir / "data/mt_bench/reference_answer/gpt-4.jsonl")
    assert sorted(refs) == list(range(101, 131)) and all(len(t) == 2 for t in refs.values())


def test_embedded_default_set():
    qs = load_questions(DEFAULT_QUESTIONS, strict_categories=True)
    assert {q.category for q in qs} == set(CATEGORY_TEMPERATURE)
    assert all(len(q.turns) == 2 for q in qs)
    # the first eight cover every category, so a --limit 8 demo sees all of them
    assert {q.category for q in qs[:8]} == set(CATEGORY_TEMPERATURE)
    for q in qs:
        if q.category in REFERENCE_CATEGORIES:
            assert len(q.reference) == 2 and all(r.strip() for r in q.reference)


def test_temperatures():
    assert answer_temperature("writing") == 0.7 and answer_temperature("math") == 0.0
    assert answer_temperature("stem") == 0.1 and answer_temperature("poetry") == 0.7


def _write(tmp_path, lines):
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("line, message", [
    ('{"category": "math", "turns": ["x"]}', "field 'question_id' is None"),
    ('{"question_id": 1, "category": "", "turns": ["x"]}', "field 'category'"),
    ('{"question_id": 1, "category": "math", "turns": "x"}', "field 'turns' is 'x'"),
    ('{"question_id": 1, "category": "math", "turns": ["a", "b", "c"]}', "list of 1 or 2 non-empty strings"),
    ('{"question_id": 1, "category": "math", "turns": ["a", ""]}', "field 'turns'"),
    ('{"question_id": 1, "category": "math", "turns": ["a"], "reference": ["r", "s"]}', "field 'reference'"),
    ('{"question_id": true, "category": "math", "turns": ["a"]}', "field 'question_id' is True"),
    ('[1, 2]', "expected a JSON object"),
    ('{"question_id": 1, "category": "math", "turns": ["a"]', "not valid JSON"),
])
def test_malformed_question_records(tmp_path, line, message):
    good = '{"question_id": 0, "category": "writing", "turns": ["fine"]}'
    path = _write(tmp_path, [good, line])
    with pytest.raises(EvalError, match="line 2") as err:
        load_questions(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_duplicate_ids_unknown_category_and_missing_file(tmp_path):
    dup = _write(tmp_path, ['{"question_id": 1, "category": "math", "turns": ["a"]}'] * 2)
    with pytest.raises(EvalError, match="repeats line 1"):
        load_questions(dup)
    odd = _write(tmp_path, ['{"question_id": 1, "category": "poetry", "turns": ["a"]}'])
    assert load_questions(odd)[0].category == "poetry"
    with pytest.raises(EvalError, match="'poetry' is not an MT-Bench category"):
        load_questions(odd, strict_categories=True)
    with pytest.raises(EvalError, match="questions file .*nope.jsonl' does not exist"):
        load_questions(tmp_path / "nope.jsonl")
    empty = _write(tmp_path, [""])
    with pytest.raises(EvalError, match="holds no questions"):
        load_questions(empty)
    with pytest.raises(EvalError, match="--limit is 0"):
        load_questions(odd, limit=0)


def test_answers_file_validation(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"question_id": 1, "model_id": "m", "choices": [{"index": 0, "turns": ["x", "y"]}]})
                 + "\n" + json.dumps({"question_id": 2, "choices": []}) + "\n")
    with pytest.raises(EvalError, match="line 2: field 'choices'"):
        load_answers(p)


def test_judge_prompt_sets(shared_dir, tmp_path):
    ours = builtin_prompts()
    assert set(ours.prompts) == set(FASTCHAT_NAMES)
    for kind, prompt in ours.prompts.items():
        marker = "[[A]]" if kind.startswith("pair") else "[[rating]]"
        assert marker in prompt.system
    fastchat = load_prompt_set(shared_dir / "data/mt_bench/judge_prompts.jsonl")
    assert fastchat["single-ref-multi"].name == "single-math-v1-multi-turn"
    msgs = fastchat["single"].messages(question="Q?", answer="A.")
    assert msgs[0]["role"] == "system" and "Q?" in msgs[1]["content"] and "A." in msgs[1]["content"]
    broken = tmp_path / "p.jsonl"
    lines = [json.loads(l) for l in (shared_dir / "data/mt_bench/judge_prompts.jsonl").read_text().splitlines()]
    for rec in lines:
        if rec["name"] == "single-v1":
            rec["prompt_template"] += " {secret}"
    broken.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(EvalError, match=r"'single-v1' uses template fields \['secret'\]"):
        load_prompt_set(broken)
    lines = [json.loads(l) for l in (shared_dir / "data/mt_bench/judge_prompts.jsonl").read_text().splitlines()]
    broken.write_text("".join(json.dumps(r) + "\n" for r in lines if r["name"] != "pair-v2"))
    with pytest.raises(EvalError, match="no prompt named 'pair-v2'"):
        load_prompt_set(broken)


def test_encodings(tmp_path):
    """A UTF-8 byte-order mark is read; Latin-1 bytes are an error naming file, line and byte."""
    from eval.common import EvalError
    from eval.questions import load_questions

    record = '{"question_id": 1, "category": "writing", "turns": ["Caf\u00e9?"]}\n'
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + record.encode("utf-8"))
    assert load_questions(bom)[0].turns == ("Caf\u00e9?",)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(record.encode("utf-8") + record.replace(": 1,", ": 2,").encode("latin-1"))
    with pytest.raises(EvalError, match=r"questions file .*latin.jsonl line 2: byte 0xe9 \(byte 57 of the line\) "
                                        r"is not UTF-8; expected UTF-8 text"):
        load_questions(latin)
