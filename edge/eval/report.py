"""Results on disk: results.json, a markdown table beside the published figures, a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from jee1.manifest import write_json_atomic

from .stats import mcnemar_exact

TASK_NAMES = {"medqa": "MedQA-USMLE", "pubmedqa": "PubMedQA", "usmle": "USMLE sample exam"}


def published() -> dict:
    """The sourced comparison figures (docs/published_results.json, shipped inside the package too)."""
    from importlib import resources

    return json.loads((resources.files("jee1.edge.eval") / "data" / "published_results.json").read_text("utf-8"))


def paired(records_a: dict, records_b: dict) -> dict:
    """Per task: questions only A got right, only B got right, McNemar's exact p."""
    out = {}
    for task in sorted({k[0] for k in records_a} & {k[0] for k in records_b}):
        keys = [k for k in records_a if k[0] == task and k in records_b]
        only_a = sum(records_a[k]["correct"] and not records_b[k]["correct"] for k in keys)
        only_b = sum(records_b[k]["correct"] and not records_a[k]["correct"] for k in keys)
        out[task] = {"n": len(keys), "only_reference_right": only_a, "only_candidate_right": only_b,
                     "mcnemar_p": mcnemar_exact(only_a, only_b)}
    return out


def run_name(run: dict) -> str:
    return f"{run['model']}: {run['file']} ({run['quant']}, {run['k_shot']}-shot, {run['mode']}, {run['style']})"


def markdown(runs: list[dict], comparison: dict | None, divergence: dict | None) -> str:
    pub = published()
    tasks = pub["columns"]
    lines = ["| model | " + " | ".join(TASK_NAMES[t] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for run in runs:    # measured here, side by side (the reference, e.g. the base, first)
        cells = []
        for t in tasks:
            r = run["tasks"].get(t)
            cells.append(f"**{100 * r['acc']:.1f}** ({100 * r['acc_ci95'][0]:.1f}–{100 * r['acc_ci95'][1]:.1f}, n={r['n']})"
                         if r else "–")
        lines.append(f"| {run_name(run)} | " + " | ".join(cells) + " |")
    if comparison:      # the paired test of the two measured rows, under them
        cells = [(f"McNemar p = {comparison[t]['mcnemar_p']:.3g} ({comparison[t]['only_reference_right']} vs "
                  f"{comparison[t]['only_candidate_right']} discordant)") if t in comparison else "–" for t in tasks]
        lines.append("| paired: reference vs model, same questions | " + " | ".join(cells) + " |")
    for row in pub["models"]:
        lines.append(f"| {row['model']} (published, five-shot, not measured here) | "
                     + " | ".join("–" if row[t] is None else f"{row[t]:.1f}" for t in tasks) + " |")
    notes = [f"Accuracy in %, 95% Wilson interval and n in brackets. Published rows: {pub['models'][0]['source']}."]
    for run in runs:
        skipped = ", ".join(f"{TASK_NAMES[t]} {len(r['malformed_rows'])}" for t, r in run["tasks"].items())
        chance = ", ".join(f"{TASK_NAMES[t]} {100 * r['chance']:.1f}%" for t, r in run["tasks"].items())
        notes.append(f"{run['model']}: {run['k_shot']}-shot, {run['mode']}, {run['style']} prompts; malformed rows "
                     f"skipped: {skipped}; chance level: {chance}.")
    if runs and not runs[0]["pre_model_safety"]:
        notes.append("The device's pre-model safety short-circuit was OFF for this run (the model itself is measured).")
    else:
        notes.append("The device's pre-model safety short-circuit was ON: red-flag questions got the fixed message.")
    out = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    if comparison:
        out += "\n| task | n | only reference right | only candidate right | McNemar p |\n|---|---|---|---|---|\n"
        for task, c in comparison.items():
            out += (f"| {TASK_NAMES[task]} | {c['n']} | {c['only_reference_right']} | {c['only_candidate_right']} | "
                    f"{c['mcnemar_p']:.3g} |\n")
    if divergence:
        out += ("\n| tokens | KL mean | KL median | KL p99 | KL max | top-1 agreement | PPL reference | PPL candidate |\n"
                "|---|---|---|---|---|---|---|---|\n"
                f"| {divergence['tokens_scored']} | {divergence['kl_mean']:.4f} | {divergence['kl_median']:.4f} | "
                f"{divergence['kl_p99']:.4f} | {divergence['kl_max']:.4f} | {100 * divergence['top1_agreement']:.1f}% | "
                f"{divergence['ppl_reference']:.3f} | {divergence['ppl_candidate']:.3f} |\n")
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pub = published()
    tasks = [t for t in pub["columns"] if any(t in r["tasks"] for r in runs)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        bars = []  # (name, accuracy %, lower error, upper error, colour)
        chance = None
        for run in runs:
            r = run["tasks"].get(task)
            if r:
                bars.append((f"{run['file']}\n{run['model']}, n={r['n']}", 100 * r["acc"],
                             100 * (r["acc"] - r["acc_ci95"][0]), 100 * (r["acc_ci95"][1] - r["acc"]), "#1f77b4"))
                chance = 100 * r["chance"]
        bars += [(f"{row['model']}\n(published)", row[task], 0.0, 0.0, "#bbbbbb")
                 for row in pub["models"] if row[task] is not None]
        names, values, low, high, colours = zip(*bars, strict=True)
        x = range(len(bars))
        ax.bar(x, values, color=colours, hatch=["" if c == "#1f77b4" else "//" for c in colours], edgecolor="white")
        ours = sum(1 for c in colours if c == "#1f77b4")
        if ours < len(bars):
            ax.axvline(ours - 0.5, color="#555555", linewidth=0.8)       # measured here | published
        if chance is not None:
            ax.axhline(chance, color="#d62728", linestyle="--", linewidth=1)
            ax.text(len(bars) - 0.5, chance + 1, f"chance {chance:.0f}%", color="#d62728", fontsize=7, ha="right")
        measured = [i for i, (_, _, lo, hi, _) in enumerate(bars) if lo or hi]
        ax.errorbar(measured, [values[i] for i in measured], yerr=[[low[i] for i in measured], [high[i] for i in measured]],
                    fmt="none", ecolor="black", capsize=4)
        ax.set_xticks(list(x), names, fontsize=7, rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_title(TASK_NAMES[task])
        ax.set_ylabel("accuracy (%), 95% CI")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="#1f77b4", label=f"measured here ({runs[0]['k_shot']}-shot, {runs[0]['mode']}, "
                                                      f"{runs[0]['style']} prompts), 95% CI"),
                        Patch(facecolor="#bbbbbb", hatch="//", edgecolor="white",
                              label="published, five-shot (not measured here)")],
               loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out_dir: Path, runs: list[dict], comparison: dict | None, divergence: dict | None) -> dict:
    results = {"runs": runs, "paired": comparison, "kl": divergence}
    write_json_atomic(out_dir / "results.json", results)
    (out_dir / "report.md").write_text(markdown(runs, comparison, divergence), encoding="utf-8")
    if runs:
        plot(runs, out_dir / "accuracy.png")
    return results
