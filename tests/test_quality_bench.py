"""The quality benchmark (benchmarks/quality*.py) at toy size: a tiny random LLaMA with a word-level tokenizer and
the real Alpaca sample. Both parts run end to end and their numbers are checked by independent routes: captured
fractions against direct sums / power iteration / a closed-form FFT projection of a gradient accumulated here with
plain per-example autograd, cached stems against the full model, the paired bootstrap against a direct difference."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks import quality, quality_common as qc, quality_coverage as qcov, quality_train as qt  # noqa: E402
from launch.data import ALPACA_HEADER, ALPACA_HEADER_WITH_INPUT, load_records  # noqa: E402


def _tiny_model_dir(root: Path, records) -> Path:
    """A 2-layer LLaMA (GQA like SmolLM2) and a whitespace word-level tokenizer over the data's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    text = " ".join([ALPACA_HEADER, ALPACA_HEADER_WITH_INPUT, "### Instruction: ### Input: ### Response:"]
                    + [f"{r.instruction} {r.input} {r.output}" for r in records])
    vocab = {"[UNK]": 0, "[EOS]": 1, "[PAD]": 2, **{w: i + 3 for i, w in enumerate(sorted(set(text.split())))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]",
                                                pad_token="[PAD]")
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, eos_token_id=1, pad_token_id=2,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    out = root / "tiny-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_dir):
    data = shared_dir / "data" / "alpaca" / "alpaca_en_demo.json"
    root = tmp_path_factory.mktemp("quality")
    return {"root": root, "data": data, "model": _tiny_model_dir(root, load_records(str(data))[:300])}


def _argv(env, part, *extra):
    root = env["root"]
    return [part, "--profile", "smoke", "--model", str(env["model"]), "--data", str(env["data"]),
            "--results", str(root / "results"), "--docs", str(root / "docs"), "--work-dir", str(root / "work"), *extra]


def _smoke_setup(env) -> qc.Setup:
    return qc.Setup(model_dir=str(env["model"]), data=str(env["data"]), **quality.PROFILES["smoke"]["setup"])


def _plain_gradient(env, names, n_grad) -> dict:
    """q,v gradient of the mean response loss, one unpadded example at a time (not the benchmark's batched path)."""
    setup = _smoke_setup(env)
    model, tok = qc.load_model(setup)
    train = qc.load_splits(setup, tok)["train"]
    mods = dict(model.named_modules())
    for n in names:
        mods[n].weight.requires_grad_(True)
    index = range(min(n_grad, len(train)))
    total = sum(sum(1 for t in train.labels[i][1:] if t != -100) for i in index)
    for i in index:
        logits = model(input_ids=torch.tensor([train.ids[i]])).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(train.labels[i][1:]), ignore_index=-100,
                                                 reduction="sum")
        (loss / total).backward()
    return {n: mods[n].weight.grad.detach().clone() for n in names}


def _sigma1_power(g: torch.Tensor, iters: int = 500) -> float:
    v = torch.ones(g.shape[1], dtype=torch.float64)
    g = g.double()
    for _ in range(iters):
        v = g.T @ (g @ v)
        v /= v.norm()
    return float((g @ v).norm() ** 2)


def test_coverage_part_runs_and_its_fractions_match_independent_routes(env, capsys):
    import sspeft
    from sspeft.transforms import dht2

    assert quality.main(_argv(env, "coverage")) == 0
    out = env["root"] / "results" / "coverage"
    base = json.loads((out / "base.json").read_text())
    assert base["records"]["val"]["n"] + base["records"]["val"]["dropped"] == 8
    assert math.isfinite(base["test_loss"]) and math.isfinite(base["full_ft"]["test_loss"])
    recs = {p.stem: json.loads(p.read_text()) for p in out.glob("*_b*_s*.json")}
    # 10 variants × 3 budgets × 2 seeds, less LoRA at ¼ of rank 1
    assert len(recs) == 10 * 3 * 2 - 2, sorted(recs)
    for name, r in recs.items():
        for m in r["grad"]["modules"].values():
            assert -1e-6 <= m["fraction"] <= 1 + 1e-6, name
            assert m["inner"] == pytest.approx(m["fraction"], abs=1e-4), name  # an orthogonal projection
        assert math.isfinite(r["eta_search"]["test_loss"]) and r["eta_search"]["eta"] > 0
    names = list(recs["shira_b56_s1"]["grad"]["modules"])
    assert len(names) == 4  # q,v of both layers
    grads = _plain_gradient(env, names, quality.PROFILES["smoke"]["coverage"]["n_grad"])

    model, _ = qc.load_model(_smoke_setup(env))
    tree = qcov.skeleton(model, names)
    for label, method, n, opts in (("shira", "shira", 56, {}), ("ssh-delta-07", "ssh", 56, {"delta": 0.7})):
        adapted = sspeft.inject(qcov.skeleton(model, names), sspeft.SpectralConfig(method=method, n=n, seed=1, **opts))
        for name, layer in sspeft.adapted_layers(adapted).items():
            g = grads[name].double()
            t = g if method == "shira" else dht2(g, "standard", "ortho")
            direct = float(t[layer.positions[0], layer.positions[1]].pow(2).sum() / g.pow(2).sum())
            assert recs[f"{label}_b56_s1"]["grad"]["modules"][name]["fraction"] == pytest.approx(direct, rel=2e-3)
    for name in names:  # LoRA r=1: σ₁² by power iteration
        frac = recs["lora_b56_s0"]["grad"]["modules"][name]["fraction"]
        assert frac == pytest.approx(_sigma1_power(grads[name]) / float(grads[name].double().pow(2).sum()), rel=2e-3)
    # LFMA through the library (CG on its own ΔW) equals the closed-form FFT projection on its positions
    adapted = sspeft.inject(tree, sspeft.SpectralConfig(method="lfma", n=28, seed=0))
    for name, layer in sspeft.adapted_layers(adapted).items():
        p, _ = qcov.FourierMaskProjector(layer.positions, tuple(grads[name].shape)).project(grads[name])
        closed = float(p.pow(2).sum() / grads[name].double().pow(2).sum())
        assert recs["lfma-top-k_b56_s0"]["grad"]["modules"][name]["fraction"] == pytest.approx(closed, rel=2e-3)

    # the bounds: the oracle holds at least what any measured support holds; LoRA's oracle and SSH δ=1's capture
    # by the closed form equal the coverage part's (power iteration above / conjugate gradients) figures
    from benchmarks import quality_bounds as qb

    assert quality.main(_argv(env, "bounds")) == 0
    bounds = json.loads((out / "bounds.json").read_text())
    for name, mod in bounds["modules"].items():
        for b, row in mod["budgets"].items():
            for basis, labels in qb.MEASURED.items():
                for label in labels:
                    for seed in (0, 1):
                        measured = recs[f"{qcov.slug(label)}_b{b}_s{seed}"]["grad"]["modules"][name]["fraction"]
                        assert measured <= row["oracle"][basis] + 1e-4, (name, b, label)
            assert row["ssh_energy_chosen"] == pytest.approx(
                recs[f"ssh-delta-1_b{b}_s0"]["grad"]["modules"][name]["fraction"], rel=2e-3, abs=1e-6)
        assert mod["lora_oracle"] == pytest.approx(recs["lora_b56_s0"]["grad"]["modules"][name]["fraction"], rel=2e-3)
        assert all(0 < x < mod["lora_oracle"] for x in mod["lora_init"])

    # resume: nothing recomputed
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.json")}
    capsys.readouterr()
    assert quality.main(_argv(env, "coverage")) == 0
    assert "'written': 0" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.json")} == stamps


def test_train_part_runs_grids_seeds_and_reports(env):
    setup = _smoke_setup(env)
    cfg = qt.TrainConfig(**quality.PROFILES["smoke"]["train"])
    ms = [m for m in qt.methods(56, 1)
          if m.label in ("SSH δ=0.7", "LoRA r=1", "FourierFT", "PEFT FourierFT", "FourierFT zero init")]
    out = env["root"] / "results" / "train"
    state = qt.run(setup, cfg, out, env["root"] / "work" / "cache", progress=lambda _: None, ms=ms)
    assert state["complete"]
    runs = [json.loads(p.read_text()) for p in out.glob("*_s*.json")]
    for m in ms:
        mine = [r for r in runs if r["label"] == m.label]
        seeds = {r["seed"] for r in mine}
        assert seeds == {0, 1}, m.label
        if m.grid:  # the chosen lr (the one run with seed 1) is an interior optimum of seed 0's grid or at the cap
            chosen = next(r["mult"] for r in mine if r["seed"] == 1)
            grid = sorted((r["mult"], r["val"]["loss"]) for r in mine if r["seed"] == 0)
            assert len(grid) >= 3 and min(grid, key=lambda t: t[1])[0] == chosen
        for r in mine:
            assert len(r["test"]["sums"]) == len(r["test"]["tokens"]) == 8 - json.loads(
                (out / "base.json").read_text())["records"]["test"]["dropped"]
            assert all(math.isfinite(x) for x in r["test"]["sums"] + r["train_losses"])
    lora = next(r for r in runs if r["label"] == "LoRA r=1")
    ssh = next(r for r in runs if r["label"] == "SSH δ=0.7")
    assert lora["trainable"] == (32 + 32) + (32 + 16) and ssh["trainable"] == 2 * 56
    peft_ft = [r for r in runs if r["label"] == "PEFT FourierFT"]
    ours = [r for r in runs if r["label"] == "FourierFT" and r["seed"] == 1]
    assert peft_ft[0]["lr"] == pytest.approx(ours[0]["lr"])  # equal settings: sspeft FourierFT's chosen lr
    zero = [r for r in runs if r["label"] == "FourierFT zero init"]
    assert [r["lr"] for r in zero] == [pytest.approx(ours[0]["lr"])] * 2 and zero[0]["options"]["init"] == "zeros"

    # the report: a verdict line for every claim, and the contrasts' intervals
    assert quality.main(_argv(env, "report")) == 0
    page = (env["root"] / "docs" / "results.md").read_text()
    from benchmarks import quality_report

    for claim in quality_report.CLAIMS:
        assert claim.title in page
    assert "unresolved" in page or "supported" in page or "contradicted" in page
    assert "| FourierFT zero init |" in page and "FourierFT's chosen lr (not searched for this row)" in page
    assert "test loss FourierFT zero init − FourierFT" in page.split("FourierFT's default init draws")[1]


def test_init_and_half_spectrum_rows_change_one_setting_at_their_reference_lr(env):
    """FourierFT zero init and LFMA half-spectrum differ from their reference rows in one option only, run at the
    reference's chosen lr, and build what they say: ΔW = 0 at init, rfft2 half-plane positions, equal scalars."""
    import copy

    ms = qt.ms_by_label(qt.methods(56, 1))
    for label, ref, extra in (("FourierFT zero init", "FourierFT", {"init": "zeros"}),
                              ("LFMA half-spectrum", "LFMA", {"half_spectrum": True})):
        m, r = ms[label], ms[ref]
        assert (m.method, m.lr0, m.grid, m.lr_from) == (r.method, r.lr0, False, ref)
        assert dict(m.options) == {**dict(r.options), **extra}
    assert qt.Run(ms["FourierFT zero init"], 3.0, 0).name == "fourierft-zero-init_x3_s0"
    setup = _smoke_setup(env)
    model, _ = qc.load_model(setup)
    targets = qt.target_regex(setup, 0, len(model.model.layers))
    built = {label: qt.attach(copy.deepcopy(model), ms[label], 0, targets)
             for label in ("FourierFT", "FourierFT zero init", "LFMA", "LFMA half-spectrum")}
    scalars = {label: sum(p.numel() for p in m.parameters() if p.requires_grad) for label, m in built.items()}
    assert len(set(scalars.values())) == 1 and scalars["LFMA"] == 4 * 56
    ranks = {label: qt.delta_ranks(m) for label, m in built.items()}
    assert ranks["FourierFT zero init"] == [0] * 4 and min(ranks["FourierFT"]) > 0
    layers = {label: [mod for mod in m.modules() if hasattr(mod, "sspeft_config")] for label, m in built.items()}
    for full, half in zip(layers["LFMA"], layers["LFMA half-spectrum"]):
        n_in = full.base_layer.weight.shape[1]
        assert half.positions[1].max() <= n_in // 2 < full.positions[1].max()


def test_stems_and_padding_are_exact(env):
    setup = _smoke_setup(env)
    model, tok = qc.load_model(setup)
    val = qc.load_splits(setup, tok)["val"]
    full = qc.record_losses(model, val, None, batch_size=3)
    one = qc.record_losses(model, val, None, batch_size=1)  # unpadded
    stems = qc.compute_stems(model, val, 1)
    qc.drop_lower_layers(model, 1)
    cached = qc.record_losses(model, val, stems, batch_size=4)
    assert cached["tokens"] == full["tokens"] == one["tokens"]
    for a, b, c in zip(full["sums"], one["sums"], cached["sums"]):
        assert a == pytest.approx(b, rel=1e-4) and c == pytest.approx(b, rel=1e-4)


def test_paired_bootstrap_and_seed_interval():
    a = {"sums": [2.0, 4.0, 6.0, 1.0], "tokens": [2, 2, 3, 1]}
    b = {"sums": [1.0, 4.0, 3.0, 1.0], "tokens": [2, 2, 3, 1]}
    res = qc.paired_bootstrap(a, b, reps=500)
    assert res["diff"] == pytest.approx((13 - 9) / 8)
    assert res["lo"] <= res["diff"] <= res["hi"] and res["lo"] >= 0  # every record's difference is ≥ 0
    assert qc.paired_bootstrap(a, a)["hi"] == 0.0
    with pytest.raises(ValueError, match="same test records"):
        qc.paired_bootstrap(a, {"sums": [1.0], "tokens": [2]})
    iv = qc.mean_interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["hi"] - 2.0 == pytest.approx(4.303 / math.sqrt(3))


def test_lr_grid_extends_past_an_edge_until_interior():
    cfg = qt.TrainConfig()
    m = qt.Method("X", "ssh", 1e-2)

    def done(losses: dict):
        return {qt.Run(m, k, 0).name: {"label": "X", "seed": 0, "mult": k, "val": {"loss": v}}
                for k, v in losses.items()}

    assert qt.grid_state("X", {}, cfg)[0] == [1 / 3, 1.0, 3.0]
    todo, best = qt.grid_state("X", done({1 / 3: 2.0, 1.0: 1.5, 3.0: 1.2}), cfg)
    assert todo == [9.0] and best is None  # best at the upper edge: extend
    todo, best = qt.grid_state("X", done({1 / 3: 2.0, 1.0: 1.5, 3.0: 1.2, 9.0: 1.3}), cfg)
    assert todo == [] and best == 3.0
    run = qt.next_run([m], done({1 / 3: 2.0, 1.0: 1.5, 3.0: 1.2, 9.0: 1.3}), cfg)
    assert (run.mult, run.seed) == (3.0, 1) and run.name == "x_x3_s1"  # then the second seed at the chosen lr


def test_verdicts_name_lrs_the_validation_loss_cannot_tell_apart():
    from benchmarks import quality_report as qr

    def rec(mult, val, test):
        return {"label": "X", "seed": 0, "mult": mult, "val": {"loss": val}, "test": {"loss": test}}

    done = {str(i): r for i, r in enumerate([rec(1.0, 1.750, 1.75), rec(3.0, 1.7440, 1.7399), rec(9.0, 1.7437, 1.7470),
                                             rec(27.0, 1.7458, 1.76), {**rec(9.0, 1.7450, 1.748), "seed": 1}])}
    train = {"done": done, "cfg": qt.TrainConfig(), "chosen": {"X": {"mult": 9.0}}}
    assert qr.close_lrs(train, "X") == ("X's validation loss at ×3 (test 1.7399) is within 0.002 of its chosen ×9 "
                                        "(test 1.7470; seed 0)")
    train["chosen"]["X"]["mult"] = 1.0
    assert qr.close_lrs(train, "X") == ""


def test_results_are_reused_across_planning_settings_only():
    setup = qc.Setup(model_dir="m", data="d")
    stored = qc.settings_of(setup, train=qt.TrainConfig(max_extensions=3))
    assert qc.same_settings(stored, qc.settings_of(setup, train=qt.TrainConfig(max_extensions=5)))
    assert qc.same_settings({**stored, "setup": {**stored["setup"], "threads": 7}}, stored)
    assert not qc.same_settings(stored, qc.settings_of(setup, train=qt.TrainConfig(max_extensions=3, steps=61)))
    assert not qc.same_settings(stored, qc.settings_of(qc.Setup(model_dir="m", data="other"), train=qt.TrainConfig()))


def test_bad_inputs_fail_before_work(tmp_path, env):
    from launch.data import DataError

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "output": 3}]))
    with pytest.raises(DataError, match="record 0"):
        quality.main(_argv(env, "coverage", "--data", str(bad)))
    small = tmp_path / "small.json"
    small.write_text(json.dumps([{"instruction": "x", "output": "y"}] * 10))
    with pytest.raises(SystemExit, match="n_val=8"):
        quality.main(_argv(env, "train", "--data", str(small)))
    with pytest.raises(SystemExit, match="does not exist"):
        quality.main(_argv(env, "coverage", "--data", str(tmp_path / "missing.json")))
    for part in ("coverage", "train"):
        with pytest.raises(SystemExit, match=r"--only: unknown labels \['nope'\]"):
            quality.main(_argv(env, part, "--only", "nope", "--data", str(tmp_path / "missing.json")))
    assert not (env["root"] / "results" / "x").exists()


# ---------------------------------------------------------------------------------------------------- verdicts
def test_verdicts_for_every_outcome_in_both_directions():
    from benchmarks import quality_verdicts as qv

    m = qv.MARGIN
    cases = [  # interval of a − b (lower is better), relation → verdict, winner
        ((-0.02, -0.01), "beats", "supported", "A"),
        ((0.01, 0.02), "beats", "contradicted", "B"),
        ((-m / 2, m / 2), "beats", "equivalent within the margin", None),
        ((-0.01, 0.01), "beats", "unresolved", None),
        ((-m / 2, m / 2), "matches", "supported", None),
        ((-0.02, -0.01), "matches", "contradicted", "A"),
        ((0.01, 0.02), "matches", "contradicted", "B"),
        ((-0.01, 0.01), "matches", "unresolved", None),
        ((-0.02, -0.01), "at_least", "supported", "A"),
        ((-m / 2, m / 2), "at_least", "supported", None),
        ((-0.01, m / 2), "at_least", "supported", None),  # not worse by the margin, no winner
        ((0.001, 0.02), "at_least", "contradicted", "B"),
        ((-0.001, 0.02), "at_least", "unresolved", None),
    ]
    mirror = {"supported": "contradicted", "contradicted": "supported"}
    for (lo, hi), relation, verdict, winner in cases:
        got, words = qv.judge(relation, lo, hi, "A", "B")
        assert got == verdict, (lo, hi, relation, words)
        assert qv.outcome(lo, hi, "A", "B").winner == winner
        assert (winner is None) or words.startswith(f"{winner} better")
        # the other direction: b − a = [−hi, −lo] names the same winner, and "b beats a" mirrors "a beats b"
        assert qv.outcome(-hi, -lo, "B", "A").winner == winner
        if relation == "beats":
            back, _ = qv.judge("beats", -hi, -lo, "B", "A")
            assert back == mirror.get(verdict, verdict)
    with pytest.raises(ValueError, match="relation='wins'"):
        qv.judge("wins", -1, 1, "A", "B")
    with pytest.raises(ValueError, match="lo must not exceed hi"):
        qv.outcome(1.0, 0.0, "A", "B")


def test_hierarchical_bootstrap_matches_the_closed_form_of_seed_and_record_variance():
    """y[s, i] = seed effect + record effect + noise. For the mean over drawn seeds and drawn records, the bootstrap
    variance is exactly A/S + B/R + E/(S·R) with A, B, E the plug-in mean squares of the seed effects, record
    effects and residuals; seeds alone give A/S and records alone B/R."""
    from benchmarks import quality_verdicts as qv

    g = torch.Generator().manual_seed(0)
    n_seeds, n_rec = 5, 60
    y = (0.004 * torch.randn(n_seeds, 1, generator=g, dtype=torch.float64)
         + 0.02 * torch.randn(1, n_rec, generator=g, dtype=torch.float64)
         + 0.01 * torch.randn(n_seeds, n_rec, generator=g, dtype=torch.float64))
    grand = y.mean()
    seed_eff, rec_eff = y.mean(1) - grand, y.mean(0) - grand
    resid = y - grand - seed_eff[:, None] - rec_eff[None, :]
    var_seeds = float(seed_eff.pow(2).mean()) / n_seeds
    var_records = float(rec_eff.pow(2).mean()) / n_rec
    var_both = var_seeds + var_records + float(resid.pow(2).mean()) / (n_seeds * n_rec)
    side = {"sums": y.tolist(), "tokens": [1] * n_rec, "seeds": list(range(n_seeds))}
    reps = 20000
    for mode, expected in (("both", var_both), ("seeds", var_seeds), ("records", var_records)):
        got = qv.hierarchical_bootstrap(side, reps=reps, resample=mode)
        assert got["var"] == pytest.approx(expected, rel=0.06), mode
        assert got["diff"] == pytest.approx(float(grand))
    share = qv.interval_sources(side, reps=reps)["seed_share"]
    assert share == pytest.approx(var_seeds / (var_seeds + var_records), abs=0.03)
    # a contrast with itself has no width; unequal record sets are refused
    same = qv.hierarchical_bootstrap(side, side, reps=200)
    assert same["lo"] == same["hi"] == 0.0 and same["paired"]
    with pytest.raises(ValueError, match="same test records"):
        qv.hierarchical_bootstrap(side, {**side, "sums": y[:, :-1].tolist(), "tokens": [1] * (n_rec - 1)})


def test_pooled_seed_sd():
    from benchmarks import quality_verdicts as qv

    sd, df = qv.pooled_seed_sd([[1.0, 1.002], [2.0, 2.004, 2.002], [5.0]])
    assert df == 3 and sd == pytest.approx(math.sqrt((2 * 0.001 ** 2 + 2 * 0.002 ** 2) / 3))


# ---------------------------------------------------------------------------------------------------- bounds
def _atoms(method: str, shape) -> torch.Tensor:
    """(m·n, K) every position's ΔW at unit coefficient, through the library's own layer."""
    from benchmarks import quality_bounds as qb

    layer, grid = qb._one_layer(torch.randn(shape, generator=torch.Generator().manual_seed(1)), method)
    cols = []
    with torch.no_grad():
        for k in range(grid[0] * grid[1]):
            layer.coefficients.zero_()
            layer.coefficients.view(-1)[k] = 1.0
            cols.append(layer.delta_weight().double().flatten())
    return torch.stack(cols, 1)


def _best_support(atoms: torch.Tensor, g: torch.Tensor, n: int) -> float:
    """The largest captured fraction over every support of n atoms (least-squares projection)."""
    import itertools

    target = g.double().flatten()
    best = 0.0
    for support in itertools.combinations(range(atoms.shape[1]), n):
        a = atoms[:, list(support)]
        p = a @ (torch.linalg.pinv(a) @ target)
        best = max(best, float(p.pow(2).sum() / target.pow(2).sum()))
    return best


def test_oracle_capture_equals_the_best_support_by_brute_force():
    from benchmarks import quality_bounds as qb

    shape, n = (4, 4), 3
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    total = float(g.pow(2).sum())
    for method in ("ssh", "shira", "waveft", "fourierft"):
        oracle = qb.oracle_capture(qb.energies(method, g), n, total)
        assert oracle == pytest.approx(_best_support(_atoms(method, shape), g, n), rel=1e-5), method
        if method != "fourierft":
            assert qb.library_energies(method, g)["parseval"] == pytest.approx(1.0, rel=1e-5)
    # LFMA: n complex coefficients on a frequency set, projected in closed form (the coverage part's projector)
    import itertools

    m, k = shape
    best = 0.0
    for support in itertools.combinations(range(m * k), 2):
        pos = torch.tensor([[s // k for s in support], [s % k for s in support]])
        p, _ = qcov.FourierMaskProjector(pos, shape).project(g)
        best = max(best, float(p.pow(2).sum()) / total)
    assert qb.oracle_capture(qb.energies("lfma", g), 2, total) == pytest.approx(best, rel=1e-6)
    # a uniformly random support holds n/(m·n) in expectation in an orthonormal basis
    e = qb.energies("ssh", g).flatten()
    assert float(e.mean() * n / total) == pytest.approx(n / (m * k))


def test_lora_init_capture_and_overlap():
    from benchmarks import quality_bounds as qb

    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = torch.randn(7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # brute force: the best b·aᵀ in the least-squares sense
    b = g @ a / (a @ a)
    direct = float(torch.outer(b, a).pow(2).sum() / g.pow(2).sum())
    assert qb.lora_init_capture(g, a) == pytest.approx(direct)
    x = torch.tensor([[5.0, 4.0], [1.0, 0.0]])
    assert qb.top_overlap(x, torch.tensor([[5.0, 0.0], [4.0, 1.0]]), 2) == 0.5
    assert qb.energy_chosen_capture(torch.tensor([3.0, 1.0, 0.0]), torch.tensor([0.0, 9.0, 8.0]), 2, 4.0) == 0.25


def test_content_duplicates_across_and_within_splits():
    from launch.data import Example

    recs = [Example("a", "", "x"), Example("b", "", "y"), Example("a", "", "x"), Example("b", "", "y"),
            Example("c", "", "z")]
    assert qc.content_duplicates(recs, {"val": [0], "test": [4], "train": [2, 1, 3]}) == [
        (("val", 0), ("train", 2)), (("train", 1), ("train", 3))]


def test_seeds_flag_is_checked_before_work(env, tmp_path):
    for bad in ("1,2", "0,0", "0,x", "0,-1"):
        with pytest.raises(SystemExit, match=r"--seeds: .*starting with 0"):
            quality.main(_argv(env, "train", "--seeds", bad, "--data", str(tmp_path / "missing.json")))
    assert quality.parse_seeds("0,3,1") == (0, 3, 1)
