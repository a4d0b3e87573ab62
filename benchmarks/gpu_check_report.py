"""The Markdown page of benchmarks/gpu_check.py, rendered from its results dict alone (bounds, targets and the
reference config are read from ``results["settings"]``), so a partial results file renders too."""

from __future__ import annotations


def _fmt(value, spec: str = ".2e") -> str:
    return "–" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    m, settings = results["machine"], results["settings"]
    lines = ["# sspeft on " + (m.get("gpu") or f"CPU ({m['platform']})"), "",
             f"`{results['command']}` — torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
             f"profile {settings['profile']}, {results.get('elapsed_s', 0):.0f} s. "
             f"Verdict: **{results.get('verdict', 'running')}**.", ""]
    lines += [f"- {name}: {s}" for name, s in results["sections"].items()] + [""]
    corr = results.get("correctness", {})
    if corr:
        lines += md_correctness(corr["cases"], "1. Correctness: every path against the reference", settings)
        lines += ["Injecting on the device (positions as on CPU):", ""]
        lines += [f"- {r['method']}: {r['status']}" + (f" — {r['error']}" if "error" in r else
                  f" ({r['same_positions']:.1%} same positions)") for r in corr["inject_on_device"]] + [""]
    lines += md_training(results)
    lines += md_inference(results.get("merged_inference", {}), settings)
    lines += md_sweep(results.get("paths", {}), settings)
    q4 = results.get("quant4", {})
    if "skipped" in q4:
        lines += ["## 5. NF4 4-bit bases", "", q4["skipped"], ""]
    elif q4:
        lines += md_correctness(q4["cases"], f"5. NF4 4-bit bases (bitsandbytes {q4['bitsandbytes']})", settings)
    if results.get("failures"):
        lines += ["## Failures", ""] + [f"- {f}" for f in results["failures"]] + [""]
    return "\n".join(lines)


def md_correctness(cases: list[dict], title: str, settings: dict) -> list[str]:
    bounds = ", ".join(f"{k} {v:.0e}" for k, v in settings["bounds"].items())
    lines = [f"## {title}", "",
             f"Max relative error against the reference path (max \\|a − b\\| / max \\|b\\|); bounds: {bounds}.", "",
             "| layer | method | dtype | path | output | input grad | coeff grad | status |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        shape = "×".join(map(str, c["shape"]))
        path = c["path"] if c.get("path_used", c["path"]) == c["path"] else f"{c['path']} (ran {c['path_used']})"
        status = c["status"] + (f": {c['error']}" if "error" in c else "")
        lines.append(f"| {c['layer']} {shape} | {c['method']} | {c['dtype']} | {path} | {_fmt(c.get('output'))} | "
                     f"{_fmt(c.get('input_grad'))} | {_fmt(c.get('coeff_grad'))} | {status} |")
    return lines + [""]


def md_speed(table: dict, title: str, reference: str, target_col) -> list[str]:
    lines = [f"### {title}", ""]
    if not table.get("rows"):
        return lines + [f"{table.get('status', 'not run')}", ""]
    rounds = table["rows"].get(reference, {}).get("rounds", 0)
    lines += [f"× {reference}: median of the per-round ratios (IQR; min–max), {rounds} rounds. "
              f"{table.get('status', '')}", "",
              f"| config | path | time (median, min–max) | × {reference} | memory (resident + step peak) | target |",
              "|---|---|---|---|---|---|"]
    for name, r in table["rows"].items():
        ratio = (f"{r['ratio']:.3f} ({r['ratio_q1']:.3f}–{r['ratio_q3']:.3f}; {r['ratio_min']:.3f}–"
                 f"{r['ratio_max']:.3f})") if "ratio" in r else "–"
        mem = r.get("memory")
        mem_s = f"{mem['total_mib']:.0f} MiB ({mem['resident_mib']:.0f} + {mem['step_peak_mib']:.0f})" if mem else "–"
        lines.append(f"| {name} | {r.get('path', '')} | {r['median_s'] * 1e3:.1f} ms ({r['min_s'] * 1e3:.1f}–"
                     f"{r['max_s'] * 1e3:.1f}) | {ratio} | {mem_s} | {target_col(name, r)} |")
    for name, why in table.get("failures", {}).items():
        lines.append(f"| {name} | failed: {why} | | | | |")
    return lines + [""]


def md_training(results: dict) -> list[str]:
    speed, settings = results.get("speed", {}), results["settings"]
    if not speed:
        return []
    lines = [f"## 2. Training step, {settings['speed_dtype']}, q_proj and v_proj adapted", "",
             settings["speed_model"], ""]
    lines += [f"- {n}: {why}" for n, why in speed.get("skipped", {}).items()]
    if results["machine"]["device"] == "cpu":
        lines += ["On CPU, a step's memory peak is the process RSS (VmRSS, VmHWM): indicative only.", ""]
    targets = settings["time_targets"]
    for tokens, table in speed["loads"].items():
        lines += md_speed(table, f"{tokens} tokens/step", settings["reference"],
                          lambda name, row: f"≤ {targets[name]:.2f}×" if name in targets else "")
    lines += ["### Targets", "", f"Time: median ratio to {settings['reference']}; memory: resident + step peak, "
              f"≤ {settings['memory_target']:.2f}× {settings['reference']}'s.", "",
              "| tokens | method | what | value | limit | result |", "|---|---|---|---|---|---|"]
    lines += [f"| {t['tokens']} | {t['method']} | {t['what']} | {_fmt(t.get('value'), '.3f')} | "
              f"{_fmt(t.get('limit'), '.2f')} | {t['status']} |" for t in speed.get("targets", [])]
    return lines + [""]


def md_inference(inf: dict, settings: dict) -> list[str]:
    if not inf:
        return []
    lines = ["## 3. Merged inference against the base model", "",
             "Logits of sspeft.merge_and_unload(model) against the adapted model (reference path):", ""]
    lines += [f"- {r['method']}: {r['status']}" + (f" (error {r['logits_error']:.2e}, bound {r['bound']:.0e})"
              if "logits_error" in r else f" — {r.get('error', '')}") for r in inf["merge_checks"]] + [""]
    limit = settings["inference_target"]
    for tokens, table in inf["loads"].items():
        lines += md_speed(table, f"forward, {tokens} tokens", "base",
                          lambda n, r: "" if n == "base" else f"≤ {limit:.2f}× {r.get('status', '')}")
    return lines


def md_sweep(sweep: dict, settings: dict) -> list[str]:
    if not sweep:
        return []
    lines = ["## 4. Every sspeft method on every forced path", ""]
    for tokens, table in sweep["loads"].items():
        lines += md_speed(table, f"{tokens} tokens/step", settings["reference"], lambda n, r: "")
    rows = sweep.get("auto_vs_best", [])
    if rows:
        lines += [f"### The cost model's choice against the fastest forced path (× {settings['reference']}, sweep "
                  "rounds)", "", "| tokens | method | auto chose | its ratio | fastest | its ratio |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['method']} | {r['auto'] or '–'} | {_fmt(r['auto_ratio'], '.3f')} | "
                  f"{r['best']} | {r['best_ratio']:.3f} |" for r in rows] + [""]
    return lines
