"""The audit's figures, computed from the stored calls of its items (only calls that returned a verdict count;
failures are tallied apart, in `failures`).

Each figure is {value, ci95, n, questions}: n items (or pairs, or calls) measured, and a 95% bootstrap interval
over questions. Names say what each is:

- position_consistency: share of pairwise (item, sample) whose verdict survives swapping the two answers' order.
- first_position_preference: share of decisive pairwise verdicts (A or B, both orders) that pick the answer shown
  first. An order-blind judge is near 0.5; one that always picks A is 1.
- repeat_exact_agreement / repeat_weighted_kappa: two judgments of the same single item (every pair of its K
  samples) give the same score / quadratic-weighted κ between them.
- repeat_flip_rate: share of pairs of samples of one pairwise item and order whose verdicts differ.
- length_score_correlation: Spearman correlation of the judged answer's length (characters) and its score.
- padding_score_change: mean score of the padded answer minus that of the same answer unpadded.
- label_*: agreement with reference labels (see eval.auditing.labels).
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations
from typing import Any, Optional

from eval.auditing.agreement import bootstrap_statistic, cohen_kappa, share, spearman, weighted_kappa
from eval.auditing.labels import Labels
from eval.judging.engine import Item, JudgmentStore

# a pairwise verdict as the outcome for the first model: A is the first model in order AB, the second in BA
OUTCOME = {"AB": {"A": "win", "B": "loss", "C": "tie"}, "BA": {"A": "loss", "B": "win", "C": "tie"}}


def _values(store: JudgmentStore, item: Item, variant: str) -> list[Optional[Any]]:
    """The stored value of each sample of one variant; None for a failed or missing call."""
    row = store.rows.get(item.key) or {}
    return [c.get("value") if c and not c.get("failure") else None for c in (row.get("calls") or {}).get(variant, [])]


def _mean(xs: list) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def repeatability_single(store: JudgmentStore, items: list[Item], seed: int) -> dict[str, Any]:
    groups: dict[Any, list] = defaultdict(list)
    for item in items:
        ok = [v for v in _values(store, item, "single") if v is not None]
        groups[item.question.question_id] += [(a, b) for a, b in combinations(ok, 2)]
    return {"repeat_exact_agreement": bootstrap_statistic(groups, lambda ps: share([a == b for a, b in ps]), seed,
                                                          "audit/repeat_exact"),
            "repeat_weighted_kappa": bootstrap_statistic(groups, weighted_kappa, seed, "audit/repeat_kappa")}


def pairwise_figures(store: JudgmentStore, items: list[Item], seed: int) -> dict[str, Any]:
    consistent: dict[Any, list] = defaultdict(list)
    first: dict[Any, list] = defaultdict(list)
    flips: dict[Any, list] = defaultdict(list)
    for item in items:
        qid = item.question.question_id
        ab, ba = _values(store, item, "AB"), _values(store, item, "BA")
        for x, y in zip(ab, ba):
            if x is not None and y is not None:
                consistent[qid].append(OUTCOME["AB"][x] == OUTCOME["BA"][y])
        first[qid] += [v == "A" for v in ab + ba if v in ("A", "B")]
        for values in (ab, ba):
            ok = [v for v in values if v is not None]
            flips[qid] += [a != b for a, b in combinations(ok, 2)]
    return {"position_consistency": bootstrap_statistic(consistent, share, seed, "audit/position_consistency"),
            "first_position_preference": bootstrap_statistic(first, share, seed, "audit/first_position"),
            "repeat_flip_rate": bootstrap_statistic(flips, share, seed, "audit/flip_rate")}


def length_figures(store: JudgmentStore, single: list[Item], padded: list[Item], answers: dict,
                   seed: int) -> dict[str, Any]:
    points: dict[Any, list] = defaultdict(list)
    changes: dict[Any, list] = defaultdict(list)
    twin = {(i.question.question_id, i.turn): i for i in padded}
    for item in single:
        qid = item.question.question_id
        score = (store.rows.get(item.key) or {}).get("score")
        if score is None:
            continue
        points[qid].append((len(answers[qid][item.turn - 1]), float(score)))
        padded_score = (store.rows.get(twin[(qid, item.turn)].key) or {}).get("score")
        if padded_score is not None:
            changes[qid].append(float(padded_score) - float(score))
    return {"length_score_correlation": bootstrap_statistic(
                points, lambda ps: spearman([x for x, _ in ps], [y for _, y in ps]), seed, "audit/length_corr"),
            "padding_score_change": bootstrap_statistic(changes, _mean, seed, "audit/padding_change")}


def _sample_outcomes(store: JudgmentStore, item: Item) -> list[str]:
    """The outcome for the first model of each sample index: sample i in order AB against sample i in BA, an
    inconsistent pair a tie (as the judge's own outcome treats the two orders)."""
    out = []
    for x, y in zip(_values(store, item, "AB"), _values(store, item, "BA")):
        if x is not None and y is not None:
            out.append(OUTCOME["AB"][x] if OUTCOME["AB"][x] == OUTCOME["BA"][y] else "tie")
    return out


def label_figures(labels: Labels, store: JudgmentStore, single: list[Item], pair: list[Item],
                  seed: int) -> dict[str, Any]:
    """The judge against reference labels on the audited items, one comparison per label and judge sample (a
    single judgment is what is audited, not the median of K); `labels_matched_share` is the share of the labels
    about this model that fell on an audited item the judge gave a verdict for."""
    if labels.kind == "pair":
        if not pair:
            return {"labels": str(labels.path), "kind": "pair", "labels_about_model": 0, "labels_matched": 0,
                    "labels_matched_share": None}
        model, other = pair[0].model, pair[0].model_b
        judged = {(i.question.question_id, i.turn): _sample_outcomes(store, i) for i in pair}
        relevant = [(r, r.outcome_for(model, other)) for r in labels.rows]
        relevant = [(r, o) for r, o in relevant if o is not None]
    else:
        model = single[0].model
        judged = {(i.question.question_id, i.turn): [float(v) for v in _values(store, i, "single") if v is not None]
                  for i in single}
        relevant = [(r, r.score) for r in labels.rows if r.model in (None, model)]
    groups: dict[Any, list] = defaultdict(list)
    matched = 0
    for r, label in relevant:
        verdicts = judged.get((r.question_id, r.turn)) or []
        matched += bool(verdicts)
        groups[r.question_id] += [(v, label) for v in verdicts]
    out: dict[str, Any] = {"labels": str(labels.path), "kind": labels.kind, "labels_about_model": len(relevant),
                           "labels_matched": matched,
                           "labels_matched_share": round(matched / len(relevant), 4) if relevant else None,
                           "label_kappa": bootstrap_statistic(groups, cohen_kappa, seed, "audit/label_kappa")}
    if labels.kind == "pair":
        out["label_agreement_with_ties"] = bootstrap_statistic(groups, lambda ps: share([a == b for a, b in ps]),
                                                               seed, "audit/label_agree_ties")
        out["label_agreement_without_ties"] = bootstrap_statistic(
            groups, lambda ps: share([a == b for a, b in ps if "tie" not in (a, b)]), seed, "audit/label_agree")
    else:
        out["label_exact_agreement"] = bootstrap_statistic(groups, lambda ps: share([a == b for a, b in ps]), seed,
                                                           "audit/label_exact")
        out["label_weighted_kappa"] = bootstrap_statistic(groups, weighted_kappa, seed, "audit/label_wkappa")
    return out


def audit_failures(store: JudgmentStore, items: list[Item]) -> dict[str, Any]:
    """Every audit call that failed or was never made, by reason, counted as eval.report counts the judge's."""
    from eval.report import failures

    rows = [store.rows[i.key] for i in items if i.key in store.rows]
    calls = sum(len(ss) for r in rows for ss in (r.get("calls") or {}).values())
    return {"calls": calls} | failures(rows, None) | (
        {"items_never_judged": len(items) - len(rows)} if len(rows) < len(items) else {})
