"""Train the safety screen's learned backstop (edge/data/safety_model.npz) on the dev and spent
splits of the labelled corpus (tests/data/safety/splits.json), never on a held-out one.

    python tools/train_safety_model.py

Two logistic regressions over hashed features (edge/safety/model.py): urgent (emergency or crisis)
against ordinary, class-balanced; and, among urgent messages, crisis against emergency.  The firing
threshold is the lowest at which 5-fold cross-validation on the training messages gives at most 1%
false triggers.  Full-batch gradient descent with Nesterov momentum, fixed iterations and seed:
the same data gives the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jee1.edge.safety import SafetyPolicy
from jee1.edge.safety.corpus import load_corpus
from jee1.edge.safety.model import features, hashed

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "data" / "safety"
OUT = REPO / "edge" / "data" / "safety_model.npz"
DIM = 1 << 18
L2, ITERATIONS, LEARNING_RATE, MOMENTUM = 1e-4, 300, 2.0, 0.9
MAX_CV_FALSE_TRIGGERS = 0.01


class Rows:
    """A sparse matrix as (row, column, value) triples: just the two products training needs."""

    def __init__(self, rows: list[tuple[np.ndarray, np.ndarray]]):
        self.n = len(rows)
        self.r = np.concatenate([np.full(len(i), k) for k, (i, _) in enumerate(rows)])
        self.c = np.concatenate([i for i, _ in rows])
        self.v = np.concatenate([v for _, v in rows])

    def dot(self, w: np.ndarray) -> np.ndarray:
        return np.bincount(self.r, weights=self.v * w[self.c], minlength=self.n)

    def tdot(self, g: np.ndarray) -> np.ndarray:
        return np.bincount(self.c, weights=self.v * g[self.r], minlength=DIM)


def train(rows: list, y: np.ndarray) -> tuple[np.ndarray, float]:
    X = Rows(rows)
    weight = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    w, b, vw, vb = np.zeros(DIM), 0.0, np.zeros(DIM), 0.0
    for _ in range(ITERATIONS):
        lw, lb = w + MOMENTUM * vw, b + MOMENTUM * vb
        g = (1 / (1 + np.exp(-(X.dot(lw) + lb))) - y) * weight
        vw = MOMENTUM * vw - LEARNING_RATE * (X.tdot(g) / len(y) + L2 * lw)
        vb = MOMENTUM * vb - LEARNING_RATE * g.mean()
        w, b = w + vw, b + vb
    return w.astype(np.float32), float(b)


def predict(rows: list, w: np.ndarray, b: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(Rows(rows).dot(w) + b)))


def main() -> None:
    roles = json.loads((CORPUS / "splits.json").read_text())
    splits = roles["dev"] + roles["spent"]       # never a held-out split
    policy = SafetyPolicy.load()
    examples = [e for split in splits for e in load_corpus(CORPUS / f"{split}.jsonl")]
    rows = [hashed(features(policy.reader.read(e.text).text), DIM) for e in examples]
    urgent = np.array([e.label != "ordinary" for e in examples], dtype=float)
    crisis = np.array([e.label == "crisis" for e in examples], dtype=float)

    fold = np.random.default_rng(0).integers(0, 5, len(examples))
    cv = np.zeros(len(examples))
    for k in range(5):
        train_rows = [r for r, f in zip(rows, fold, strict=True) if f != k]
        w, b = train(train_rows, urgent[fold != k])
        cv[fold == k] = predict([r for r, f in zip(rows, fold, strict=True) if f == k], w, b)
    threshold = next(t for t in np.arange(0.50, 0.995, 0.01)
                     if ((cv >= t) & (urgent == 0)).sum() / (urgent == 0).sum() <= MAX_CV_FALSE_TRIGGERS)
    cv_recall = ((cv >= threshold) & (urgent == 1)).sum() / urgent.sum()

    w_urgent, b_urgent = train(rows, urgent)
    urgent_rows = [r for r, u in zip(rows, urgent, strict=True) if u]
    w_crisis, b_crisis = train(urgent_rows, crisis[urgent == 1])
    np.savez_compressed(OUT, dim=DIM, w_urgent=w_urgent.astype(np.float16), b_urgent=b_urgent,
                        w_crisis=w_crisis.astype(np.float16), b_crisis=b_crisis, threshold=round(float(threshold), 2),
                        trained_on=np.array(splits), rules_version=policy.version)
    print(f"{OUT}: {len(examples)} messages from {', '.join(splits)}; threshold {threshold:.2f} "
          f"(5-fold CV: recall {cv_recall:.3f} at <= {MAX_CV_FALSE_TRIGGERS:.0%} false triggers)")


if __name__ == "__main__":
    main()
