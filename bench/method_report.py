"""The method study's outputs: method.json (every run, every cell's statistics, the verdicts),
method.md (the tables a person reads) and the plots. Numbers in, files out: no training here."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from method_grid import DEFAULT, ONESHOT, PAP, SCRATCH

from effllm.common.fileio import write_atomic, write_json_atomic


def summarize(rows: list[dict]) -> list[dict]:
    """Mean, standard deviation and standard error of the held-out perplexity per cell."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target"], r["budget"], r["variant"]), []).append(r)
    out = []
    for (method, target, budget, variant), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        ppl = [r["heldout_ppl"] for r in rs]
        sd = statistics.stdev(ppl) if len(ppl) > 1 else float("nan")
        out.append({
            "method": method, "target": target, "budget": budget, "variant": variant, "n": len(ppl),
            "ppl_mean": statistics.fmean(ppl), "ppl_sd": sd, "ppl_se": sd / math.sqrt(len(ppl)),
            "ppl": ppl, "params_mean": statistics.fmean(r["params"] for r in rs),
            "hidden_sizes": sorted({r["hidden_size"] for r in rs}),
        })  # fmt: skip
    return out


def compare(a: dict, b: dict, names: tuple[str, str] | None = None) -> dict:
    """b relative to a: the gap in mean perplexity, its standard error and the verdict (2 SE rule):
    the name of the lower-perplexity side (``names``, default the two methods) or "tie"."""
    name_a, name_b = names or (a["method"], b["method"])
    gap = b["ppl_mean"] - a["ppl_mean"]
    se = math.sqrt(a["ppl_se"] ** 2 + b["ppl_se"] ** 2)
    if not math.isfinite(se) or abs(gap) <= 2 * se:
        verdict = "tie"
    else:
        verdict = name_a if gap > 0 else name_b
    return {"gap": gap, "gap_pct": 100 * gap / a["ppl_mean"], "se": se,
            "gap_in_se": gap / se if se > 0 else float("inf"), "winner": verdict}  # fmt: skip


VARIANT_NAMES = {
    (PAP, DEFAULT): "(i) pruning-aware (defaults: linear budget, phase 0.6)",
    (PAP, "phase0.3"): "(i) pruning-aware, phase 0.3 of the budget",
    (PAP, "phase0.9"): "(i) pruning-aware, phase 0.9 of the budget",
    (PAP, "cubic"): "(i) pruning-aware, cubic (front-loaded) budget curve",
    (ONESHOT, DEFAULT): "(iii) one-shot + recovery (same saliency)",
    (ONESHOT, "first-order"): "(iii) one-shot + recovery, first-order Taylor score (abs of sum g*w)",
    (SCRATCH, "auto-arch"): "(ii) scratch, (i)'s auto-designed architecture",
    (SCRATCH, "uniform-arch"): "(ii) scratch, uniform architecture of equal size",
}


def variant_name(method: str, variant: str) -> str:
    if variant.startswith("stem-price"):
        short = "(i) pruning-aware" if method == PAP else "(iii) one-shot + recovery"
        return f"{short}, hidden channels priced at {variant.removeprefix('stem-price')}"
    return VARIANT_NAMES.get((method, variant), f"{method}, {variant}")


def fmt_ppl(s: dict) -> str:
    return f"{s['ppl_mean']:.2f} ± {s['ppl_sd']:.2f}"


def architecture(row: dict) -> str:
    return " ".join(f"{h}/{k}/{f}" for h, k, f in row["layer_shapes"]) + f", d={row['hidden_size']}"


def write_results(results: Path, cells, rows: dict, facts: dict, preset, args, seconds: float) -> dict:
    results.mkdir(parents=True, exist_ok=True)
    all_rows = [rows[c.key] for c in cells]
    stats = summarize(all_rows)
    by = {(s["method"], s["target"], s["budget"], s["variant"]): s for s in stats}
    core = []
    for target in preset.targets:
        for budget in sorted({c.budget for c in cells}):
            a, b = by.get((PAP, target, budget, DEFAULT)), by.get((ONESHOT, target, budget, DEFAULT))
            if a and b:
                core.append({"target": target, "budget": budget, "pruning_aware": a, "one_shot": b, **compare(a, b)})
    size_gaps = [
        abs(rows[c.key]["params"] - rows[c.reference().key]["params"]) / rows[c.reference().key]["params"]
        for c in cells
        if c.method == ONESHOT
    ]
    around = [s for s in stats if s["variant"] != DEFAULT or s["method"] == SCRATCH]
    extras = []
    for s in around:
        # a one-shot variant against one-shot's defaults; everything else against (i)'s defaults
        ref_method = ONESHOT if s["method"] == ONESHOT else PAP
        ref = by.get((ref_method, s["target"], s["budget"], DEFAULT))
        if ref is not None:
            names = ("(iii) defaults" if ref_method == ONESHOT else "(i) defaults", "this cell")
            extras.append({"cell": variant_name(s["method"], s["variant"]), "stats": s, "reference": ref,
                           "reference_name": names[0], **compare(ref, s, names)})  # fmt: skip
    # no machine paths in the results: a run is named by its directory under the study's runs/
    public_rows = [{**{k: v for k, v in r.items() if k != "model_dir"}, "run_dir": f"runs/{r['key']}"}
                   for r in all_rows]  # fmt: skip
    report = {
        "preset": args.preset, "why": preset.why, "seconds": seconds, "corpus": facts["corpus"],
        "source": facts["source"], "rows": public_rows, "cells": stats, "core": core, "extras": extras,
        "max_size_gap_pair": max(size_gaps) if size_gaps else None,
        "train_minutes": (sum(r["train_seconds"] for r in all_rows) + facts["source"]["train_seconds"]) / 60,
    }  # fmt: skip
    write_json_atomic(results / "method.json", report)
    md = markdown(report, preset, args)
    write_atomic(results / "method.md", md)
    plot_budgets(report, results / "method_ppl_vs_budget.png")
    plot_source(report, results / "method_source_curve.png")
    example = max((r for r in all_rows if r["method"] == PAP and r["variant"] == DEFAULT
                   and r["target"] == min(preset.targets)), key=lambda r: (r["budget"], -r["seed"]), default=None)  # fmt: skip
    if example is not None:
        plot_param_types(Path(example["model_dir"]).parent, results / "method_params_by_type.png")
    print(md)
    return report


def markdown(report: dict, preset, args) -> str:
    src, corpus = report["source"], report["corpus"]
    lines = [
        f"# Method study (preset `{report['preset']}`)",
        "",
        f"Training time summed over all {len(report['rows'])} runs and S: {report['train_minutes']:.0f} min "
        f"(runs go {preset.workers} at a time; this invocation: {report['seconds'] / 60:.1f} min wall, "
        "finished runs reused).",
        "",
        f"Corpus: {corpus['name']}: {corpus['train_tokens']:,} training and {corpus['heldout_tokens']:,} held-out "
        f"tokens (whole documents). Source S: {src['params']:,} parameters ({src['layers']} layers, hidden "
        f"{src['hidden']}, {src['heads']} heads / {src['kv_heads']} KV, FFN {src['ffn']}, vocab {src['vocab']}; "
        f"embedding {src['embedding_fraction']:.1%}), pretrained on {src['tokens']:,} tokens "
        f"({src['epochs']:.2f} epochs), held-out perplexity {src['heldout_ppl']:.2f}. Sizes: {report['why']}",
        "",
        "Every cell: mean ± standard deviation of held-out perplexity over "
        f"{len(preset.seeds)} seeds (the seed changes data order and all randomness). A winner is named only "
        "where the gap exceeds two standard errors. (iii) is pruned to exactly the size (i) reached in the "
        f"same cell and seed: the largest size gap of a pair is {100 * (report['max_size_gap_pair'] or 0):.2f}%.",
        "",
        "## (i) pruning-aware vs (iii) one-shot + recovery",
        "",
        "| target | tokens | (i) params | (i) ppl | (iii) ppl | (iii) - (i) | in SE | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["core"]:
        a, b = c["pruning_aware"], c["one_shot"]
        lines.append(
            f"| {c['target']} | {c['budget']:,} | {a['params_mean'] / 1e3:.0f}K | {fmt_ppl(a)} | {fmt_ppl(b)} | "
            f"{c['gap']:+.2f} ({c['gap_pct']:+.1f}%) | {c['gap_in_se']:+.1f} | {c['winner']} |"
        )
    lines += ["", "## Around the paper's ratio (0.28), and hidden channels priced lower (0.12)", "",
              "| cell | target | tokens | ppl | against | gap | in SE | verdict |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in report["extras"]:
        s = e["stats"]
        lines.append(
            f"| {e['cell']} | {s['target']} | {s['budget']:,} | {fmt_ppl(s)} | {e['reference_name']} "
            f"{e['reference']['ppl_mean']:.2f} | {e['gap']:+.2f} ({e['gap_pct']:+.1f}%) | {e['gap_in_se']:+.1f} "
            f"| {e['winner']} |"
        )
    lines += ["", "## Architectures (seed 1; heads/KV heads/FFN per layer, hidden size)", ""]
    seen = set()
    for r in report["rows"]:
        key = (r["method"], r["target"], r["budget"], r["variant"])
        if r["seed"] != min(preset.seeds) or key in seen or r["method"] == SCRATCH:
            continue
        seen.add(key)
        name = variant_name(r["method"], r["variant"])
        lines.append(f"- {name}, target {r['target']}, {r['budget']:,} tokens: {r['params']:,} params: {architecture(r)}")
    lines += ["", f"Command: `python bench/method.py --preset {args.preset}" + (" --data ..." if args.data else "") + "`",
              "Plots: method_ppl_vs_budget.png, method_params_by_type.png, method_source_curve.png."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_budgets(report: dict, path: Path) -> None:
    plt = _plt()
    targets = sorted({c["target"] for c in report["core"]})
    if not targets:
        return
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.8), squeeze=False)
    for ax, target in zip(axes[0], targets):
        cs = [c for c in report["core"] if c["target"] == target]
        x = [c["budget"] for c in cs]
        for key, label in (("pruning_aware", "(i) pruning-aware"), ("one_shot", "(iii) one-shot + recovery")):
            ax.errorbar(x, [c[key]["ppl_mean"] for c in cs], yerr=[c[key]["ppl_sd"] for c in cs], marker="o",
                        capsize=3, label=label)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{b / 1e3:.0f}K" for b in x])
        ax.minorticks_off()
        ax.set_title(f"target {target:.0%} of S")
        ax.set_xlabel("training tokens")
    axes[0][0].set_ylabel("held-out perplexity (mean ± sd)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_source(report: dict, path: Path) -> None:
    plt = _plt()
    curve = report["source"]["curve"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([c["tokens"] / 1e6 for c in curve], [c["heldout_loss"] for c in curve], marker="o")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("held-out loss")
    ax.set_title("source S pretraining")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_param_types(run: Path, path: Path) -> None:
    """Parameters per group type vs tokens for one (i) run (like the paper's Fig. A0), with the
    density of each removed group by type."""
    plt = _plt()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    prunes = [json.loads(line) for line in (run / "prune_log.jsonl").read_text().splitlines() if line]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    t = [m["tokens"] / 1e3 for m in metrics]
    for key, label in (("attention_params", "attention"), ("ffn_params", "FFN"), ("embedding_params", "embedding")):
        ax.plot(t, [m[key] / 1e3 for m in metrics], label=label)
    ax2 = ax.twinx()
    ax2.plot(t, [m["hidden_size"] for m in metrics], color="black", ls="--", label="hidden size")
    ax2.set_ylabel("hidden size")
    ax.set_xlabel("tokens (thousands)")
    ax.set_ylabel("parameters (thousands)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("one (i) run: parameters by type")
    colors = {"attention": "tab:blue", "ffn": "tab:orange", "stem": "tab:green"}
    for kind, color in colors.items():
        rs = [r for r in prunes if r["type"] == kind]
        if rs:
            bx.scatter([r["tokens"] / 1e3 for r in rs], [max(r["density"], 1e-14) for r in rs], s=6, color=color,
                       label=f"{kind} ({len(rs)} removed)")  # fmt: skip
    bx.set_yscale("log")
    bx.set_xlabel("tokens (thousands)")
    bx.set_ylabel("density of each removed group")
    bx.legend(fontsize=8)
    bx.set_title("what selection removed, when")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    print("run bench/method.py; this module only writes its results", file=sys.stderr)
    sys.exit(2)


__all__ = ["write_results"]
