"""The pre-model safety screen on the labelled corpus (tests/data/safety/): recall on emergencies
and crises and false triggers on ordinary messages, each with its 95% Wilson interval, per split and
per category; every miss, wrong kind and false trigger by name; median and p99 time per message
against a baseline in the same run (reading the message alone, without the rules).

    python benchmarks/safety_bench.py [--split dev --split heldout ...] [--rules FILE] [--json] [--show-held-out]

The lines of a held-out split (any split splits.json does not list as dev, train or spent) are never
printed unless --show-held-out is given: whoever changes the screen must not read them (docs/safety.md), and a run over every split
once put two held-out splits' misses on the rule writer's screen.

Targets (docs/safety.md): recall 100% on dev and >= 99% held-out, false triggers <= 2% on each,
median < 1 ms per message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from jee1.edge.safety import SafetyPolicy
from jee1.edge.safety.corpus import load_corpus, measure, seen_splits, split_roles

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "safety"
SPLITS = tuple(sorted((p.stem for p in CORPUS.glob("*.jsonl")), key=lambda s: (s != "dev", s)))
ROLES = split_roles(CORPUS)
MARK = {**{s: "" for s in ROLES["dev"]}, **{s: "~" for s in ROLES["train"]}, **{s: "+" for s in ROLES["spent"]},
        **{s: "*" for s in ROLES["held_out"]}}
SEEN = set(seen_splits(ROLES))


HELD_OUT_LINES = ("misses", "wrong_kind", "false_trigger_lines")


def count(lines) -> int:
    return lines if isinstance(lines, int) else len(lines)


def pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def reading_only_ms(policy: SafetyPolicy, texts: list[str]) -> float:
    times = []
    for text in texts:
        t0 = time.perf_counter()
        policy.reader.read(text)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", action="append", choices=SPLITS, help="default: all")
    ap.add_argument("--rules", help="rules file (default: the shipped rules)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--show-held-out", action="store_true",
                    help="also print the misses and false triggers of held-out splits (not for the rule writer)")
    args = ap.parse_args()
    policy = SafetyPolicy.load(args.rules)
    report = {"rules_version": policy.version, "splits": {}}
    for split in args.split or SPLITS:
        examples = load_corpus(CORPUS / f"{split}.jsonl")
        policy.reader.correct.cache_clear()          # each split pays for its own spelling lookups
        fig = measure(policy, examples).as_json()
        policy.reader.correct.cache_clear()
        fig["reading_only_median_ms"] = reading_only_ms(policy, [e.text for e in examples])
        if split not in SEEN and not args.show_held_out:   # held out, or not yet listed
            for key in HELD_OUT_LINES:
                fig[key] = len(fig[key])          # counts only: the lines stay unread
        report["splits"][split] = fig
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"safety rules {policy.version}\n")
    print(f"{'split':<9} {'recall':>7} {'95% CI':>15} {'false trig.':>12} {'95% CI':>15} {'wrong kind':>10} "
          f"{'median ms':>9} {'p99 ms':>7} {'read-only ms':>12}")
    for split, f in report["splits"].items():
        print(f"{split + MARK.get(split, '?'):<9} {pct(f['recall']):>7} {pct(f['recall_ci95'][0])}-{pct(f['recall_ci95'][1]).strip():>7} "
              f"{f['false_triggers']:>3}/{f['ordinary']:<3} {pct(f['false_trigger_rate'])} "
              f"{pct(f['false_trigger_ci95'][0])}-{pct(f['false_trigger_ci95'][1]).strip():>7} {count(f['wrong_kind']):>10} "
              f"{f['median_ms']:>9.3f} {f['p99_ms']:>7.3f} {f['reading_only_median_ms']:>12.3f}")
        print(f"          caught {f['caught']}/{f['emergencies']}")
    print("~ train: the learned model's training data only   + spent: held out, measured first, then changed for "
          "(no longer evidence)   * held out: never changed for (tests/data/safety/splits.json)")
    for split, f in report["splits"].items():
        print(f"\n== {split}: per category (caught/emergencies, false triggers/ordinary)")
        for cat, c in f["by_category"].items():
            print(f"  {cat:<16} {c['caught']:>3}/{c['emergencies']:<3}  {c['false_triggers']:>2}/{c['ordinary']}")
        if isinstance(f["misses"], int):
            print("  (held out: misses and false triggers not shown; --show-held-out prints them)")
            continue
        for m in f["misses"]:
            print(f"  MISS  [{m['category']}] {m['text']}")
        for w in f["wrong_kind"]:
            print(f"  KIND  [{w['label']} -> {w['got']}] {w['text']}")
        for t in f["false_trigger_lines"]:
            print(f"  FALSE [{t['category']}] ({t['rule']}) {t['text']}")


if __name__ == "__main__":
    main()
