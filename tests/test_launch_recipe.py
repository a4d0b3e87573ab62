"""Recipes (every shipped file validates), overrides, unknown-key messages, path resolution, the run directory."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from launch.recipe import (ModelSection, RecipeError, adapter_fields, load_recipe, load_resolved, methods,
                           parse_override)
from launch.rundir import RunDir, atomic_directory, atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in SHIPPED}
    for method in methods():
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
        assert "learning_rate" in raw["train"] and "optim" in raw["train"]
        assert recipe.model.quantize == "nf4" and recipe.train.deepspeed
        paged = recipe.train.optim.startswith("paged") or "8bit" in recipe.train.optim
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


def _valid(names) -> str:
    return "Valid keys: " + ", ".join(names)


@pytest.mark.parametrize("override, where, message", [
    ("train.max_step=5", "file", "unknown key in section 'train' 'train.max_step'; did you mean 'train.max_steps'? "
                                 "Valid keys: resume and the fields of trl.SFTConfig (transformers.TrainingArguments)"),
    ("trian.max_steps=5", "override", "unknown section 'trian'; did you mean 'train'? "
                                      "Valid keys: model, adapter, data, train, eval"),
    ("adapter.dleta=0.5", "file", "unknown key in section 'adapter' for method 'ssh' 'adapter.dleta'; did you mean "
                                  "'adapter.delta'? " + _valid(sorted(adapter_fields("ssh")))),
    ("model.quantise=nf4", "file", "unknown key in section 'model' 'model.quantise'; did you mean 'model.quantize'? "
                                   + _valid(f.name for f in dataclasses.fields(ModelSection))),
])
def test_unknown_keys_name_the_source_the_key_the_closest_key_and_the_valid_ones(tmp_path, override, where, message):
    path = _write(tmp_path, BASIC)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [override])
    source = f"{path}, override {override!r}" if where == "file" else f"override {override!r}"
    assert str(err.value) == f"{source}: {message}"


def test_unknown_key_in_file(tmp_path):
    path = _write(tmp_path, BASIC.replace("train: {max_steps: 3}", "train: {max_steps: 3, warmup_stesp: 0.1}"))
    with pytest.raises(RecipeError, match=r"r\.yaml.*'train\.warmup_stesp'.*did you mean 'train\.warmup_steps'"):
        load_recipe(path)


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=abc", "train.max_steps = 'abc' has the wrong type; expected an integer"),
    ("model.quantize=int8", "model.quantize = 'int8' has the wrong type; expected one of ['nf4', 'none']"),
    ("adapter.method=dora", f"adapter.method = 'dora' is not a known method; expected one of {list(methods())}"),
    ("train.max_steps=0", "train.max_steps = 0 must be positive or -1 (use num_train_epochs)"),
    ("data.eval_fraction=1.5", "data.eval_fraction = 1.5 must lie in [0, 1)"),
    ("adapter.n=-3", "adapter section invalid for method 'ssh': SpectralConfig.n=-3 must be a positive integer"),
    ("name=a/b", "name = 'a/b' must be a non-empty name without '/'"),
])
def test_bad_override_values_name_the_field_the_value_and_what_is_expected(tmp_path, override, message):
    path = _write(tmp_path, BASIC)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [override])
    assert str(err.value) == f"{path}, override {override!r}: {message}"


def test_errors_name_the_override_that_caused_them_or_the_file(tmp_path):
    path = _write(tmp_path, BASIC.replace("data: {path: data.json}", "data: {path: data.json, eval_fraction: 1.5}"))
    with pytest.raises(RecipeError) as err:  # the file's own error, whatever overrides come with it
        load_recipe(path, ["train.max_steps=4"])
    assert str(err.value) == f"{path}: data.eval_fraction = 1.5 must lie in [0, 1)"
    path = _write(tmp_path, BASIC)
    with pytest.raises(RecipeError) as err:  # the second of two overrides: only together do they contradict
        load_recipe(path, ["train.deepspeed=launch/ds_zero3.json", "model.device_map=auto"])
    assert str(err.value).startswith(f"{path}, override 'model.device_map=auto': ")


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


@pytest.mark.parametrize("old, new", [("epochs", "num_train_epochs"), ("per_device_batch_size",
                                                                      "per_device_train_batch_size"),
                                      ("lr_scheduler", "lr_scheduler_type"), ("optimizer", "optim"),
                                      ("warmup_ratio", "warmup_steps")])
def test_earlier_train_keys_name_their_sftconfig_name(tmp_path, old, new):
    with pytest.raises(RecipeError, match=rf"train\.{old} is now train\.{new}, SFTConfig's name"):
        load_recipe(_write(tmp_path, BASIC), [f"train.{old}=1"])


@pytest.mark.parametrize("key, home", [("output_dir", "run_dir"), ("resume_from_checkpoint", "train.resume"),
                                       ("data_seed", "train.seed"), ("use_cpu", "no GPU"),
                                       ("trust_remote_code", "model.trust_remote_code"),
                                       ("assistant_only_loss", "assistant's turns")])
def test_pipeline_owned_keys_say_where_they_live(tmp_path, key, home):
    with pytest.raises(RecipeError, match=rf"train\.{key} is set by the pipeline.*lives in .*{home}"):
        load_recipe(_write(tmp_path, BASIC), [f"train.{key}=1"])


def test_any_sftconfig_field_reaches_the_trainer_arguments(tmp_path):
    from launch.recipe import Recipe
    from launch.sftconfig import sft_kwargs

    recipe = load_recipe(_write(tmp_path, BASIC), [
        "train.adam_beta2=0.95", "train.lr_scheduler_type=cosine_with_min_lr",
        "train.lr_scheduler_kwargs={min_lr_rate: 0.1}", "train.neftune_noise_alpha=5", "train.optim=adafactor",
        "train.max_length=64", "train.packing=true", "train.report_to=none", "train.warmup_steps=2"])
    assert recipe.train.options["adam_beta2"] == 0.95 and recipe.train.optim == "adafactor"
    assert recipe.data.max_length == 64 and recipe.data.packing is True  # SFTConfig's data keys, kept in data:
    kwargs = sft_kwargs(recipe.train, recipe.data, output_dir=str(tmp_path / "ck"), has_eval=False)
    assert kwargs["adam_beta2"] == 0.95 and kwargs["neftune_noise_alpha"] == 5 and kwargs["max_length"] == 64
    assert kwargs["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1} and kwargs["data_seed"] == recipe.train.seed
    # the resolved recipe keeps every key and reloads to the same recipe
    recipe.dump(tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again.to_dict() == recipe.to_dict() and isinstance(again, Recipe)
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["train"]["adam_beta2"] == 0.95


@pytest.mark.parametrize("override, needle", [
    ("train.lr_scheduler_type=cosine_fast", "train.lr_scheduler_type = 'cosine_fast' is refused by SFTConfig"),
    ("train.optim=adam_fast", "train.optim = 'adam_fast'"),
    ("train.save_strategy=sometimes", "train.save_strategy = 'sometimes'"),
    ("train.adam_beta2=high", "train.adam_beta2 = 'high' has the wrong type; expected a number"),
    ("train.report_to=tensorbored", "'tensorbored' is not an integration transformers knows"),
    # a known integration that is missing here (only where wandb is not installed)
    *([("train.report_to=[wandb]", "'wandb' is not installed here")]
      if importlib.util.find_spec("wandb") is None else []),
    ("train.lr_scheduler_type=reduce_lr_on_plateau", "requires an eval strategy"),
    ("train.eval_strategy=steps", "needs held-out data; set data.eval_fraction"),
    ("train.bf16=true", "contradicts model.dtype = 'fp32'"),
    ("train.fp16=true", "train.fp16 = true is not supported"),
    ("train.max_length=99", "contradicts data.max_length = 64"),
    ("train.warmup_steps=1.5", "train.warmup_steps = 1.5"),
])
def test_sftconfig_values_are_checked_by_sftconfig(tmp_path, override, needle):
    text = BASIC.replace("model: {path: ./model}", "model: {path: ./model, dtype: fp32}").replace(
        "data: {path: data.json}", "data: {path: data.json, max_length: 64}")
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, text), [override])
    assert needle in str(err.value) and str(tmp_path) in str(err.value)


def test_dry_validation_sets_up_no_devices(tmp_path):
    from accelerate import PartialState

    PartialState._reset_state()
    load_recipe(_write(tmp_path, BASIC), ["train.adam_beta1=0.8"])
    assert PartialState._shared_state == {}  # no process group, nothing a launcher would trip over
