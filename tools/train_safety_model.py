"""Train the safety screen's learned model (edge/data/safety_model.npz) on the dev, train and spent
splits of the labelled corpus (tests/data/safety/splits.json), never on a held-out one.

    python tools/train_safety_model.py

Over hashed features (edge/safety/model.py): urgent (emergency or crisis against ordinary),
class-balanced, read by two heads over features scaled by their naive-Bayes log-count ratio (NBSVM):
a logistic regression and a network with one hidden layer of HIDDEN units (the model fires on their
mean; an overrule needs both all but sure); and, among urgent messages, crisis against emergency, a
logistic regression.  Trained with torch (a test-time dependency only: the device reads the weights
with numpy), Adam over shuffled mini-batches, fixed seed and one thread: the same data gives the
same weights.

The firing threshold is chosen by leave-one-author-out cross-validation: each split in
``cross_validation`` (splits.json: the ones whose lines no rule was written against) is scored by a
model trained on every other split, and the screen (the rules, unless both urgent heads are below
``overrule_below`` on the message and on the evidence of every rule that fires, read alone, where
the model may overrule them; plus the heads' mean at or above ``threshold``) is measured on them
together (``scores``, ``screened``).  The two figures are
the pair, from a grid, that ``choose`` picks: the most recall within MAX_CV_FALSE_TRIGGERS if that
reaches MIN_CV_RECALL, else the fewest false triggers at MIN_CV_RECALL or more; what other budgets
would buy is stored with them (``frontier``).  A new author's messages are what the device will
meet, so that is what the threshold is chosen on; random folds of one author's lines flatter it.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from jee1.datafiles import read_toml
from jee1.edge.safety import RULES_FILE, SafetyPolicy
from jee1.edge.safety.corpus import load_corpus, seen_splits, split_roles
from jee1.edge.safety.model import UrgentHeads, UrgentNet, hashed
from jee1.errors import InputError
from jee1.manifest import replace_file_atomic

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "data" / "safety"
OUT = REPO / "edge" / "data" / "safety_model.npz"
DIM = 1 << 18
EPOCHS, BATCH, LEARNING_RATE, L2, SEED = 8, 64, 0.02, 1e-6, 0
# The hidden-layer head: in leave-one-author-out cross-validation over 13 authors, alone, it missed 40
# of the 628 emergencies no rule caught where the linear head missed 61, at the same 10 false triggers
# (32 units: no better).
HIDDEN, HIDDEN_LEARNING_RATE, HIDDEN_START = 16, 0.005, 0.1
# More recall is bought with false triggers up to this budget, no further.  It is under the 2% target
# because every new author's ordinary messages so far were harder than the cross-validation folds':
# with the budget at 2% (3.3.x), the five fresh held-out splits gave 2.1-4.2% false triggers.
MAX_CV_FALSE_TRIGGERS = 0.015
# The recall target, never bought back with false triggers.  Above the 99% held-out target because
# every new author's emergencies so far were harder to catch than the folds': screen 3.6.0, at 99.1%
# in cross-validation, caught 97.3-98.8% of five fresh held-out splits' (docs/safety.md).
MIN_CV_RECALL = 0.995
FRONTIER_BUDGETS = (0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025)
THRESHOLDS = np.round(np.arange(0.30, 0.96, 0.01), 2)      # the model fires where no rule did at or above
# A rule's firing stands unless the model is below this: "all but sure".  Capped at 0.1 by choice, not
# by the cross-validation, which would go higher: 3.4.0's 0.4 silenced unpunctuated emergencies that
# 3.3.1 caught ("dad has crushing chest pain sweaty is that normal", p 0.06), found by a review.
OVERRULE_BELOW = (0.02, 0.05, 0.10)


def _batch(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = np.concatenate([i for i, _ in rows])
    offsets = np.cumsum([0] + [len(i) for i, _ in rows[:-1]])
    weights = np.concatenate([v for _, v in rows])
    return torch.from_numpy(flat), torch.from_numpy(offsets), torch.from_numpy(weights)


def _fit(rows: list, y: np.ndarray, logits, optimizers: list, penalty=lambda: 0.0) -> None:
    """Class-balanced training over shuffled mini-batches (fixed seed): ``logits`` scores a batch."""
    rng = np.random.default_rng(SEED)
    balance = torch.tensor([0.5 / (1 - y.mean()), 0.5 / y.mean()], dtype=torch.float32)
    for _ in range(EPOCHS):
        order = rng.permutation(len(rows))
        for k in range(0, len(order), BATCH):
            ix = order[k:k + BATCH]
            target = torch.from_numpy(y[ix].astype(np.float32))
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(
                logits(_batch([rows[i] for i in ix])), target, reduction="none") * balance[target.long()]).mean()
            loss = loss + penalty()
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()


def train(rows: list, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Class-balanced logistic regression: (weights over DIM buckets, bias)."""
    torch.manual_seed(SEED)
    w = torch.nn.EmbeddingBag(DIM, 1, mode="sum")
    torch.nn.init.zeros_(w.weight)
    b = torch.nn.Parameter(torch.zeros(1))
    _fit(rows, y, lambda batch: w(*batch).squeeze(-1) + b, [torch.optim.Adam([w.weight, b], lr=LEARNING_RATE)],
         lambda: L2 * (w.weight ** 2).sum())
    return w.weight.detach().numpy()[:, 0].copy(), float(b.item())


def log_count_ratio(rows: list, y: np.ndarray) -> np.ndarray:
    """Each bucket's naive-Bayes log-count ratio, urgent against ordinary, add-one smoothed."""
    urgent, ordinary = np.ones(DIM), np.ones(DIM)
    for (idx, _), label in zip(rows, y, strict=True):
        (urgent if label else ordinary)[idx] += 1
    return np.log((urgent / urgent.sum()) / (ordinary / ordinary.sum())).astype(np.float32)


def train_urgent(rows: list, y: np.ndarray) -> UrgentHeads:
    """The urgent heads, each over each feature scaled by its naive-Bayes log-count ratio (NBSVM-style,
    Wang and Manning, 2012: in cross-validation that caught more at fewer false triggers than raw
    features), the scale folded into the weights: a logistic regression and ``train_hidden``.  The
    weights are rounded to float16, as the device reads them, so cross-validation scores what ships."""
    ratio = log_count_ratio(rows, y)
    scaled = [(idx, val * ratio[idx]) for idx, val in rows]
    w, b = train(scaled, y)
    return UrgentHeads((w * ratio).astype(np.float16).astype(np.float32), b, train_hidden(scaled, y, ratio))


def train_hidden(scaled: list, y: np.ndarray, ratio: np.ndarray) -> UrgentNet:
    """One hidden layer, class-balanced.  The embedding starts at zero and the hidden units switched on
    (HIDDEN_START), so a feature training never saw adds exactly nothing; sparse Adam updates only the
    rows a batch touches."""
    torch.manual_seed(SEED)
    embed = torch.nn.EmbeddingBag(DIM, HIDDEN, mode="sum", sparse=True)
    torch.nn.init.zeros_(embed.weight)
    hidden_bias = torch.nn.Parameter(torch.full((HIDDEN,), HIDDEN_START))
    out = torch.nn.Linear(HIDDEN, 1)
    _fit(scaled, y, lambda batch: out(torch.relu(embed(*batch) + hidden_bias)).squeeze(-1),
         [torch.optim.SparseAdam(list(embed.parameters()), lr=HIDDEN_LEARNING_RATE),
          torch.optim.Adam([*out.parameters(), hidden_bias], lr=HIDDEN_LEARNING_RATE)])
    embed_scaled = (embed.weight.detach().numpy() * ratio[:, None]).astype(np.float16)
    return UrgentNet(embed_scaled, hidden_bias.detach().numpy().copy(),
                     out.weight.detach().numpy()[0].copy(), float(out.bias.item()))


def predict(rows: list, heads: UrgentHeads) -> np.ndarray:
    """Each message's (linear, hidden-layer) p(urgent): shape (messages, 2)."""
    return np.array([heads.probabilities(i, v) for i, v in rows]).reshape(len(rows), 2)


def evidence_rows(policy: SafetyPolicy, readings: list, overrulable: np.ndarray) -> list:
    """Each message's overrule evidence (``SafetyPolicy.overrule_evidence``), hashed, where the model
    may overrule a rule's firing; None elsewhere (the evidence is never read there)."""
    return [[hashed(text, DIM) for text in policy.overrule_evidence(r)] if can else None
            for can, r in zip(overrulable, readings, strict=True)]


def scores(rows: list, evidence: list, heads: UrgentHeads) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the device reads for each message (``Score``): the heads' mean and the surer head, on the
    message; and the surer head on the most urgent of its evidence (1.0 where ``evidence`` is None)."""
    both = predict(rows, heads)
    p_evidence = np.array([predict(ev, heads).max() if ev else 1.0 for ev in evidence])
    return both.mean(axis=1), both.max(axis=1), p_evidence


def overruled(overrulable: np.ndarray, p_highest: np.ndarray, p_evidence: np.ndarray,
              overrule_below: float) -> np.ndarray:
    """The rule firings the model overrules (SafetyPolicy._overruled): both heads below ``overrule_below``
    on the message (``p_highest``) and on the most urgent reading of the evidence."""
    return overrulable & (p_highest < overrule_below) & (p_evidence < overrule_below)


def screened(rule_fired: np.ndarray, overrulable: np.ndarray, p: np.ndarray, p_highest: np.ndarray,
             p_evidence: np.ndarray, threshold: float, overrule_below: float) -> np.ndarray:
    """The screen's decision (SafetyPolicy.check): a rule's firing stands unless overruled; the model
    fires where the heads' mean ``p`` is at or above ``threshold``."""
    return (rule_fired & ~overruled(overrulable, p_highest, p_evidence, overrule_below)) | (p >= threshold)


def _most_recall(point: tuple) -> tuple:
    """Sort key for (recall, false-trigger rate, ...): the most recall, then the fewest false triggers."""
    return point[0], -point[1]


def choose(grid: list[tuple]) -> tuple:
    """The operating point, of (recall, false-trigger rate, threshold, overrule level): the most recall
    within the false-trigger budget, if that reaches MIN_CV_RECALL; if not, recall comes first: the
    fewest false triggers at MIN_CV_RECALL or more (or, failing that, the most recall).  Of equals,
    the fewest false triggers, then the lowest overrule level (the grid's order)."""
    within = [g for g in grid if g[1] <= MAX_CV_FALSE_TRIGGERS]
    if within and max(within, key=_most_recall)[0] >= MIN_CV_RECALL:
        return max(within, key=_most_recall)
    enough = [g for g in grid if g[0] >= MIN_CV_RECALL]
    return min(enough, key=lambda g: (g[1], -g[0])) if enough else max(grid, key=_most_recall)


def cross_validate(rows: list, evidence: list, split_of: np.ndarray, rule_fired: np.ndarray,
                   overrulable: np.ndarray, urgent: np.ndarray, folds: list[str]) -> tuple[float, float, dict]:
    p, p_highest, p_evidence = np.full(len(rows), np.nan), np.ones(len(rows)), np.ones(len(rows))
    for split in folds:
        held = split_of == split
        heads = train_urgent([r for r, h in zip(rows, held, strict=True) if not h], urgent[~held])
        p[held], p_highest[held], p_evidence[held] = scores(
            [rows[i] for i in np.flatnonzero(held)], [evidence[i] for i in np.flatnonzero(held)], heads)
        print(f"  cross-validation: {split} scored by a model trained without it", file=sys.stderr)
    scored = ~np.isnan(p)
    ordinary, emergencies = scored & (urgent == 0), scored & (urgent == 1)

    def figures(threshold: float, overrule_below: float) -> tuple[float, float]:
        fired = screened(rule_fired, overrulable, p, p_highest, p_evidence, threshold, overrule_below)
        return (fired & emergencies).sum() / emergencies.sum(), (fired & ordinary).sum() / ordinary.sum()

    grid = [(*figures(t, v), float(t), v) for v in OVERRULE_BELOW for t in THRESHOLDS]
    recall, false_triggers, threshold, overrule_below = choose(grid)
    overruled_ = rule_fired & overruled(overrulable, p_highest, p_evidence, overrule_below)
    frontier = {}       # what each false-trigger budget would buy: the trade-off the choice sits on
    for budget in FRONTIER_BUDGETS:
        best = max((g for g in grid if g[1] <= budget), key=_most_recall, default=None)
        frontier[f"{budget:.4f}"] = best and [round(float(best[0]), 4), round(float(best[1]), 4), *best[2:]]
    rules_recall = (rule_fired & emergencies).sum() / emergencies.sum()
    rules_false = (rule_fired & ordinary).sum() / ordinary.sum()
    return threshold, overrule_below, {"folds": folds, "messages": int(scored.sum()), "recall": round(float(recall), 4),
                       "false_trigger_rate": round(float(false_triggers), 4),
                       "rules_alone_recall": round(float(rules_recall), 4),
                       "rules_alone_false_trigger_rate": round(float(rules_false), 4),
                       "overruled_emergencies": int((overruled_ & emergencies).sum()),
                       "overruled_ordinary": int((overruled_ & ordinary).sum()),
                       "emergencies": int(emergencies.sum()), "ordinary": int(ordinary.sum()), "frontier": frontier}


def main() -> None:
    torch.set_num_threads(1)
    roles = split_roles(CORPUS)
    splits = seen_splits(roles)
    rules = read_toml(RULES_FILE, "safety rules")
    rules["learned"]["enabled"] = False          # the rules and the reading alone: the model is what is made here
    policy = SafetyPolicy(rules, str(RULES_FILE))
    examples, split_of = [], []
    for split in splits:
        for e in load_corpus(CORPUS / f"{split}.jsonl"):
            examples.append(e)
            split_of.append(split)
    readings = [policy.reader.read(e.text) for e in examples]
    rows = [hashed(r.text, DIM) for r in readings]
    hits = [policy.screen_rules.first(r) for r in readings]
    rule_fired = np.array([h is not None for h in hits])
    overrulable = np.array([policy.overrulable(h, r) for h, r in zip(hits, readings, strict=True)])
    evidence = evidence_rows(policy, readings, overrulable)
    urgent = np.array([e.label != "ordinary" for e in examples], dtype=float)
    crisis = np.array([e.label == "crisis" for e in examples], dtype=float)

    threshold, overrule_below, cv = cross_validate(rows, evidence, np.array(split_of), rule_fired, overrulable,
                                                   urgent, roles["cross_validation"])
    heads = train_urgent(rows, urgent)
    urgent_rows = [r for r, u in zip(rows, urgent, strict=True) if u]
    w_crisis, b_crisis = train(urgent_rows, crisis[urgent == 1])
    weights = io.BytesIO()
    np.savez_compressed(weights, dim=DIM, w_urgent=heads.w.astype(np.float16), b_urgent=heads.b,
                        urgent_embed=heads.net.embed, urgent_hidden_bias=heads.net.hidden_bias,
                        urgent_out=heads.net.out, urgent_bias=heads.net.bias,
                        w_crisis=w_crisis.astype(np.float16), b_crisis=b_crisis, threshold=threshold,
                        overrule_below=overrule_below, trained_on=np.array(splits), rules_version=policy.version,
                        cross_validation=json.dumps(cv))
    try:
        replace_file_atomic(OUT, weights.getvalue())      # the device never sees half a model
    except OSError as e:
        sys.exit(f"{OUT}: cannot write the model ({e.strerror}); the old one is unchanged")
    print(f"{OUT}: {len(examples)} messages from {', '.join(splits)}; threshold {threshold:.2f}, rules overruled "
          f"below {overrule_below}. Leave-one-author-out over {len(cv['folds'])} splits ({cv['messages']} messages): "
          f"recall {cv['recall']:.3f}, false triggers {cv['false_trigger_rate']:.3f} (rules alone "
          f"{cv['rules_alone_recall']:.3f}, {cv['rules_alone_false_trigger_rate']:.3f}); it overruled the rules on "
          f"{cv['overruled_ordinary']} of {cv['ordinary']} ordinary messages and {cv['overruled_emergencies']} of "
          f"{cv['emergencies']} emergencies")


if __name__ == "__main__":
    try:
        main()
    except InputError as e:          # a corpus file or the rules unreadable: one line, not a traceback
        sys.exit(f"error: {e}")
