"""The real-source study's outputs: method_real.json (every cell, statistics, verdicts) and method_real.md
(the tables a person reads, with the samples). Numbers in, files out: no training here."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from method_report import compare

from effllm.common.fileio import write_atomic, write_json_atomic

KINDS = ("domain", "general")
KIND_NAMES = {"domain": "in-domain", "general": "general English"}


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, sd / math.sqrt(len(values))


def summarize(rows: list[dict]) -> list[dict]:
    """Per (target, recipe): mean and standard error of each kind's perplexity, and the other columns' means."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["recipe"]), []).append(r)
    out = []
    for (target, recipe), rs in sorted(groups.items()):
        entry = {"target": target, "recipe": recipe, "n": len(rs), "seeds": [r["seed"] for r in rs]}
        for kind in KINDS:
            mean, se = _stats([r[kind]["ppl"] for r in rs])
            entry[kind] = {"ppl_mean": mean, "ppl_se": se, "ppl": [r[kind]["ppl"] for r in rs],
                           "top1_vs_source": statistics.fmean(r[kind]["top1_vs_source"] for r in rs)}  # fmt: skip
        for col in ("params", "size_vs_source", "tokens_per_s", "train_seconds", "repeated_4grams"):
            entry[col] = statistics.fmean(r[col] for r in rs)
        out.append(entry)
    return out


def verdicts(summary: list[dict]) -> list[dict]:
    """The comparisons the study is for, per target and held-out kind (2 SE rule; "tie" otherwise)."""
    by = {(s["target"], s["recipe"]): s for s in summary}
    pairs = []
    for target in sorted({s["target"] for s in summary if s["target"] < 1}):
        for suffix in ("", " + distill"):
            pairs.append((target, "continuous" + suffix, "one-shot" + suffix))
        for schedule in ("continuous", "one-shot"):
            pairs.append((target, schedule, schedule + " + distill"))
        for s in summary:
            if s["target"] == target and s["recipe"].endswith(", uniform"):
                pairs.append((target, s["recipe"].removesuffix(", uniform"), s["recipe"]))
    out = []
    for target, a, b in pairs:
        if (target, a) not in by or (target, b) not in by:
            continue
        for kind in KINDS:
            v = compare({**by[(target, a)][kind], "method": a}, {**by[(target, b)][kind], "method": b})
            out.append({"target": target, "a": a, "b": b, "kind": kind, **v})
    return out


def _fmt(entry: dict) -> str:
    se = entry["ppl_se"]
    return f"{entry['ppl_mean']:.2f}" + (f" ± {se:.2f}" if math.isfinite(se) else "")


def render(preset_name: str, preset, texts: dict, source: dict, summary: list[dict], found: list[dict], rows: dict,
           seconds: float) -> str:  # fmt: skip
    lines = [
        "# The method on a real source: SmolLM2-135M" if preset.source is None else f"# The method on {preset.source}",
        "",
        f"`python bench/method.py --preset {preset_name}` ({preset.why}). {len(rows)} cells finished, "
        f"{seconds / 60:.0f} min in this invocation. Every cell: {preset.tokens:,} training tokens of "
        f"{texts['domain']} ({preset.batch_size} x {preset.seq_len} a step, lr {preset.lr:g}, warmup "
        f"{preset.warmup_steps}); held-out: {preset.eval_windows * preset.seq_len:,} tokens of each kind, whole documents of "
        f"the same text that training never saw, and {texts['general']}. Perplexity "
        "mean ± standard error over the seeds; top-1: agreement of the argmax with S's on the same text; "
        "repeated 4-grams: the share of the greedy samples' 4-grams seen earlier in the same sample.",
        "",
        f"Source S: {source['params']:,} parameters, ppl {source['domain']['ppl']:.2f} in-domain, "
        f"{source['general']['ppl']:.2f} general English, repeated 4-grams {source['repeated_4grams']:.2f}.",
        "",
        "| target | recipe | seeds | size vs S | ppl in-domain | ppl general | top-1 in-domain | top-1 general "
        "| repeated 4-grams | train tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['target']:g} | {s['recipe']} | {s['n']} | {s['size_vs_source']:.3f} | {_fmt(s['domain'])} | "
            f"{_fmt(s['general'])} | {s['domain']['top1_vs_source']:.3f} | {s['general']['top1_vs_source']:.3f} | "
            f"{s['repeated_4grams']:.2f} | {s['tokens_per_s']:.0f} |"
        )
    lines += ["", "## Verdicts (a winner only past 2 standard errors)", "",
              "| target | held-out | a | b | b - a (ppl) | in SE | winner |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for v in found:
        lines.append(f"| {v['target']:g} | {KIND_NAMES[v['kind']]} | {v['a']} | {v['b']} | {v['gap']:+.2f} "
                     f"({v['gap_pct']:+.1f}%) | {v['gap_in_se']:+.1f} | {v['winner']} |")  # fmt: skip
    lines += ["", "## Architectures (first seed)", "", "| cell | hidden | heads per layer | FFN widths per layer |",
              "|---|---|---|---|"]  # fmt: skip
    first_seed = {}
    for row in rows.values():
        first_seed.setdefault((row["target"], row["recipe"]), row)
    for row in first_seed.values():
        heads = " ".join(str(h) for h, _, _ in row["layer_shapes"])
        ffn = " ".join(str(f) for _, _, f in row["layer_shapes"])
        lines.append(f"| {row['key']} | {row['hidden_size']} | {heads} | {ffn} |")
    lines += ["", "## Greedy samples (first seed)", ""]
    for title, judged in [("S", source)] + [(row["key"], row) for row in first_seed.values()]:
        lines.append(f"**{title}**")
        lines.append("")
        for sample in judged["samples"]:
            text = " ".join(sample["text"].split())
            lines.append(f"- {sample['prompt']} → {text!r} (repeated 4-grams {sample['repeated_4grams']:.2f})")
        lines.append("")
    return "\n".join(lines)


def results_stem(preset_name: str) -> str:
    return "method_real" if preset_name == "real" else f"method_{preset_name.replace('-', '_')}"


def write_real_results(results: Path, preset_name: str, preset, texts: dict, source: dict, rows: dict,
                       seconds: float) -> None:  # fmt: skip
    """``texts``: what the training text and the general-English text are, in words, for the report."""
    from dataclasses import asdict

    stem = results_stem(preset_name)
    summary = summarize(list(rows.values()))
    found = verdicts(summary)
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results / f"{stem}.json", {"preset": preset_name, "settings": asdict(preset), "texts": texts, "source": source,
                                                  "summary": summary, "verdicts": found, "rows": rows})  # fmt: skip
    write_atomic(
        results / f"{stem}.md", render(preset_name, preset, texts, source, summary, found, rows, seconds) + "\n"
    )
