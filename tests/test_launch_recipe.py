"""Recipes (every shipped file validates), overrides, unknown-key messages, path resolution, the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launch.recipe import RecipeError, load_recipe, load_resolved, parse_override
from launch.rundir import RunDir, atomic_directory, atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in SHIPPED}
    for method in ("ssh", "lfma", "waveft", "fourierft", "shira", "lora"):
        assert f"alpaca/llama31_8b_{method}.yaml" in names
    assert any(n.startswith("demo/") for n in names)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert Path(recipe.run_dir).is_absolute()
    if recipe.train.deepspeed:
        ds = Path(recipe.train.deepspeed)
        assert ds.is_file(), ds
        stage = json.loads(ds.read_text())["zero_optimization"]["stage"]
        assert stage in (2, 3)
        if stage == 3:
            assert json.loads(ds.read_text())["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    raw = yaml.safe_load(path.read_text())
    if "alpaca" in path.parts:
        # every setting spelled out so library defaults never change these runs
        adapter_keys = set(raw["adapter"])
        assert {"method", "target_modules"} <= adapter_keys
        if recipe.adapter.method != "lora":
            assert {"n", "scaling", "normalization", "init", "seed"} <= adapter_keys
        assert "learning_rate" in raw["train"] and "optimizer" in raw["train"]
        assert recipe.model.quantize == "nf4" and recipe.train.deepspeed
        paged = recipe.train.optimizer.startswith("paged") or "8bit" in recipe.train.optimizer
        assert paged == (recipe.adapter.method == "lora")


def test_alpaca_settings_match_the_papers():
    ssh = load_recipe(REPO / "recipes/alpaca/llama31_8b_ssh.yaml")
    assert ssh.adapter.options["n"] == 750 and ssh.adapter.options["target_modules"] == ["q_proj", "v_proj"]
    fourier = load_recipe(REPO / "recipes/alpaca/llama31_8b_fourierft.yaml")
    assert fourier.adapter.options["n"] == 1000 and fourier.adapter.options["scaling"] == 300.0
    assert fourier.train.learning_rate >= 1e-2


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASIC = """
name: t
run_dir: runs/x
model: {path: ./model}
adapter: {method: ssh, n: 8}
data: {path: data.json}
train: {max_steps: 3}
eval: {judge: local:./judge}
"""


def test_paths_resolve_against_the_recipe_file(tmp_path):
    recipe = load_recipe(_write(tmp_path, BASIC))
    assert recipe.run_dir == str(tmp_path / "runs/x")
    assert recipe.model.path == str(tmp_path / "model")
    assert recipe.data.path == str(tmp_path / "data.json")
    assert recipe.eval.judge == f"local:{tmp_path / 'judge'}"


def test_hub_ids_and_keywords_stay(tmp_path):
    recipe = load_recipe(_write(tmp_path, BASIC), ["model.path=meta-llama/Llama-3.1-8B", "data.path=yahma/alpaca-cleaned"])
    assert recipe.model.path == "meta-llama/Llama-3.1-8B"
    assert recipe.data.path == "yahma/alpaca-cleaned"
    assert load_recipe(_write(tmp_path, BASIC), ["model.path=smollm2"]).model.path == "smollm2"


def test_overrides_parse_yaml_values_and_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    recipe = load_recipe(_write(tmp_path / "sub", BASIC),
                         ["train.max_steps=7", "model.quantize=none", "train.learning_rate=1e-3",
                          "run_dir=out", "adapter.target_modules=[q_proj]"])
    assert recipe.train.max_steps == 7 and recipe.model.quantize == "none"
    assert recipe.train.learning_rate == pytest.approx(1e-3)  # PyYAML reads 1e-3 as a string
    assert recipe.run_dir == str(tmp_path / "out")
    assert recipe.adapter.options["target_modules"] == ["q_proj"]


@pytest.mark.parametrize("override, needle", [
    ("train.max_step=5", "'train.max_steps'"),
    ("trian.max_steps=5", "'trian'"),
    ("adapter.dleta=0.5", "'adapter.delta'"),
    ("model.quantise=nf4", "'model.quantize'"),
])
def test_unknown_keys_name_the_file_and_the_closest_key(tmp_path, override, needle):
    path = _write(tmp_path, BASIC)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [override])
    assert str(path) in str(err.value) or "override" in str(err.value)
    assert needle in str(err.value)


def test_unknown_key_in_file(tmp_path):
    path = _write(tmp_path, BASIC.replace("train: {max_steps: 3}", "train: {max_steps: 3, warmup_ration: 0.1}"))
    with pytest.raises(RecipeError, match=r"r\.yaml.*'train\.warmup_ration'.*did you mean 'train\.warmup_ratio'"):
        load_recipe(path)


@pytest.mark.parametrize("override, needle", [
    ("train.max_steps=abc", "train.max_steps = 'abc'"),
    ("model.quantize=int8", "one of ['nf4', 'none']"),
    ("adapter.method=dora", "adapter.method = 'dora'"),
    ("train.max_steps=0", "train.max_steps = 0"),
    ("data.eval_fraction=1.5", "data.eval_fraction = 1.5"),
    ("adapter.n=-3", "n=-3"),
    ("name=a/b", "name = 'a/b'"),
])
def test_bad_values_are_named(tmp_path, override, needle):
    with pytest.raises((RecipeError, ValueError)) as err:
        load_recipe(_write(tmp_path, BASIC), [override])
    assert needle in str(err.value)


def test_zero3_with_device_map_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="device_map"):
        load_recipe(_write(tmp_path, BASIC), ["train.deepspeed=launch/ds_zero3.json", "model.device_map=auto"])


def test_lora_fields_come_from_peft(tmp_path):
    text = BASIC.replace("adapter: {method: ssh, n: 8}", "adapter: {method: lora, r: 4, lora_alpha: 8}")
    recipe = load_recipe(_write(tmp_path, text))
    assert recipe.adapter.options == {"r": 4, "lora_alpha": 8}
    with pytest.raises(RecipeError, match="'adapter.lora_alpha'"):
        load_recipe(_write(tmp_path, text), ["adapter.lora_alpah=3"])


def test_override_syntax():
    assert parse_override("train.max_steps=3") == ("train", "max_steps", 3)
    assert parse_override("run_dir=/x") == ("", "run_dir", "/x")
    with pytest.raises(RecipeError, match="section.key=value"):
        parse_override("train.max_steps")
    with pytest.raises(RecipeError, match="section.key"):
        parse_override("a.b.c=1")


def test_dump_and_load_resolved_round_trip(tmp_path):
    recipe = load_recipe(_write(tmp_path, BASIC), ["train.max_steps=9"])
    run = RunDir(recipe.run_dir)
    recipe.dump(run.recipe)
    again = load_resolved(run.root)
    assert again.to_dict() == recipe.to_dict()
    assert again.differences(recipe) == []
    other = load_recipe(_write(tmp_path, BASIC), ["train.max_steps=10", "adapter.n=9"])
    assert other.differences(recipe) == ["adapter.n", "train.max_steps"]
    # keys that do not change the trained weights may change on resume
    same = load_recipe(_write(tmp_path, BASIC), ["train.max_steps=9", "train.save_steps=3"])
    assert same.differences(recipe) == []


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="launch.train"):
        load_resolved(tmp_path)


def test_run_dir_layout(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.recipe.name == "recipe.yaml" and run.template.name == "template.jinja"
    assert run.params.name == "params.json" and run.report_png.name == "report.png"
    assert run.answers_file("tuned") == run.root / "answers" / "tuned.jsonl"
    assert run.judgments_file("gpt-4", "pair") == run.root / "judgments" / "gpt-4_pair.jsonl"
    assert run.baseline_run().root == run.root / "baseline"
    with pytest.raises(ValueError, match="model_id"):
        run.answers_file("../x")
    with pytest.raises(ValueError, match="single"):
        run.judgments_file("j", "triple")
    assert run.is_fresh()
    run.slurm.mkdir(parents=True)
    assert run.is_fresh()
    atomic_write_json(run.params, {"trainable": 1})
    assert not run.is_fresh()
    assert json.loads(run.params.read_text()) == {"trainable": 1}
    assert not list(run.root.glob(".*tmp"))


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "d") as out:
        (out / "f").write_text("partial")
        raise RuntimeError("boom")
    assert not (tmp_path / "d").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with atomic_directory(tmp_path / "d") as out:
        (out / "f").write_text("v1")
    with atomic_directory(tmp_path / "d") as out:
        (out / "g").write_text("v2")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["g"]
