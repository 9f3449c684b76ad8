"""effllm-bench's report: one row per measured target (with roofline and accuracy), the ratios between
rows, and bench.json (for machines), bench.md (the table) and bench.png (a chart), written atomically.

Accuracy columns (top-1 agreement, perplexity change) come from effllm-export's verify.json when it
sits in the export directory. Paths in the written files are relative to the working directory (or
shortened to their last parts), so that a results file names no machine's directories.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from effllm.common.fileio import write_atomic

from .backend import read_json
from .bench_targets import BenchSettings, Target
from .roofline import roofline_tokens_per_s, weights_per_token

# Keys whose values name files or directories (top level, rows, settings): written as portable_path.
PATH_KEYS = ("model", "path", "export_dir", "out", "work", "extra")


def portable_path(path: str | Path) -> str:
    """``path`` as a results file should name it: relative to the working directory when inside it
    (runs/quickstart/export), else ".../" and its last three parts, so no machine's directories show."""
    resolved = Path(path).expanduser().resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path("...", *resolved.parts[-3:]))


def without_machine_paths(value, key: str | None = None):
    """``value`` with every absolute path under a PATH_KEYS key made portable (see portable_path)."""
    if isinstance(value, dict):
        return {k: without_machine_paths(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [without_machine_paths(v, key) for v in value]
    if key in PATH_KEYS and isinstance(value, str) and os.path.isabs(value):
        return portable_path(value)
    return value


def enrich(target: Target, result: dict, bandwidth: float | None, verify: dict) -> dict:
    """The target's row: its description, the measurement, bytes per token, roofline, accuracy."""
    row = asdict(target) | result
    row.setdefault("error", None)
    wbytes, how = weights_per_token(target)
    row["weight_bytes_per_token"], row["weight_bytes_source"] = wbytes, how
    decode = (result.get("decode") or {}).get("tokens_per_s")
    roof = roofline_tokens_per_s(bandwidth, wbytes)
    row["roofline_tokens_per_s"] = roof
    row["roofline_fraction"] = decode / roof if decode and roof else None
    accuracy = verify.get(target.variant) if target.backend != "torch" else None
    row["accuracy"] = (
        {k: accuracy.get(k) for k in ("top1_agreement", "ppl_increase", "max_abs_logit_diff", "passed")}
        if accuracy
        else None
    )
    return row


def read_verify(export_dir: str | None) -> dict:
    report = read_json(Path(export_dir) / "verify.json") if export_dir else {}
    return {v["name"]: v for v in report.get("variants", []) if isinstance(v, dict) and "name" in v}


def add_ratios(rows: list[dict]) -> None:
    """decode speed vs torch (same model) and vs the same backend's fp32 variant (quantization speed-up)."""

    def decode(row):
        return (row.get("decode") or {}).get("tokens_per_s")

    for row in rows:
        same_model = [r for r in rows if r.get("model", "") == row.get("model", "")]
        torch_row = next((r for r in same_model if r["backend"] == "torch" and decode(r)), None)
        fp32 = next(
            (r for r in same_model if r["backend"] == row["backend"] and r["quantization"] == "fp32" and decode(r)),
            None,
        )
        mine = decode(row)
        row["decode_vs_torch"] = mine / decode(torch_row) if mine and torch_row else None
        row["decode_vs_fp32"] = mine / decode(fp32) if mine and fp32 else None


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(x, spec=".1f", scale=1.0):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x * scale, spec)


def markdown_table(report: dict) -> str:
    lengths = report["settings"]["prompt_lengths"]
    multi = len({r.get("model", "") for r in report["results"]}) > 1
    head = (["model"] if multi else []) + ["backend", "variant", "size MiB", "load s", "TTFT ms"]
    head += [f"prefill {n} tok/s" for n in lengths]
    head += ["decode tok/s", "vs torch", "vs fp32", "peak RSS MiB", "over runtime MiB", "weights/token MiB"]
    head += ["roofline tok/s"]
    head += ["achieved/roofline", "top-1 agree", "ppl change"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [r.get("model", "")] if multi else []
        cells += [r["backend"], r["variant"], _fmt(r.get("file_bytes"), ".2f", 1 / 2**20)]
        if r.get("error"):
            cells += ["error: " + r["error"].replace("|", "/")] + ["-"] * (len(head) - len(cells) - 1)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells += [_fmt(r.get("load_s"), ".2f"), _fmt(r.get("ttft_s"), ".0f", 1000)]
        for n in lengths:
            p = (r.get("prefill") or {}).get(str(n))
            cells.append(_fmt(p and p.get("tokens_per_s"), ".0f"))
        acc = r.get("accuracy") or {}
        ppl = acc.get("ppl_increase")
        cells += [
            _fmt((r.get("decode") or {}).get("tokens_per_s"), ".1f"),
            _fmt(r.get("decode_vs_torch"), ".2f") + ("x" if r.get("decode_vs_torch") else ""),
            _fmt(r.get("decode_vs_fp32"), ".2f") + ("x" if r.get("decode_vs_fp32") else ""),
            _fmt(r.get("peak_rss_mb"), ".0f"),
            _fmt(r.get("model_rss_mb"), ".0f"),
            _fmt(r.get("weight_bytes_per_token"), ".1f", 1 / 2**20),
            _fmt(r.get("roofline_tokens_per_s"), ".1f"),
            _fmt(r.get("roofline_fraction"), ".2f"),
            _fmt(acc.get("top1_agreement"), ".3f"),
            "-" if ppl is None else f"{100 * ppl:+.2f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    if report.get("kind") == "android":
        d = report.get("device", {})
        where = f"Android device {d.get('model') or '?'} ({d.get('soc') or '?'}, Android {d.get('android') or '?'}, serial {d.get('serial')})"
    else:
        bw = m.get("memory_bandwidth_gb_s")
        where = (
            f"{m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, measured read bandwidth "
            f"{_fmt(bw, '.1f')} GB/s; load average {m.get('load_average_start')} at start, "
            f"{m.get('load_average_end')} at end"
        )
    notes = sorted({n for r in report["results"] for n in (r.get("notes") or [])})
    text = [
        "# effllm-bench",
        "",
        f"Model: `{report['model']}`  ",
        f"Machine: {where}  ",
        f"Threads: {s.get('threads') or 'runtime default'}; prompts {', '.join(map(str, s['prompt_lengths']))} tokens; "
        f"decode {s['new_tokens']} new tokens after a {s['prompt_lengths'][0]}-token prompt; "
        f"{s['warmup']} warm-up + {s['repeats']} measured runs, medians.",
        "",
        markdown_table(report),
        "",
        "load: a cold start, importing the backend's libraries included. "
        "TTFT: the first prompt through the model until the first token is chosen. vs torch: decode speed over "
        "torch eager's on the same model; vs fp32: over the same backend's fp32 variant. peak RSS: the whole "
        "process's; over runtime: the peak minus the process once the runtime's libraries are imported (what "
        "the model costs: weights, the runtime's copies of them, KV cache, activations). Roofline: memory "
        "bandwidth / bytes of weights read per token (an upper bound for decoding). top-1 agree / ppl change: "
        "effllm-export's verification of the variant against fp32 torch.",
    ]
    if notes:
        text += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(text) + "\n"


def chart_png(report: dict) -> bytes | None:
    """Decode and prefill speed per backend/variant as bars (PNG bytes); one row of panels per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    rows = [r for r in report["results"] if not r.get("error")]
    if not rows:
        return None
    models = list(dict.fromkeys(r.get("model", "") for r in rows))
    lengths = report["settings"]["prompt_lengths"]
    heights = [len([r for r in rows if r.get("model", "") == m]) for m in models]
    fig, axes = plt.subplots(
        len(models),
        2,
        figsize=(13, 0.42 * sum(heights) + 1.6 * len(models)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for (ax_decode, ax_prefill), model in zip(axes, models):
        mine = [r for r in rows if r.get("model", "") == model]
        y = np.arange(len(mine))
        decode = [(r.get("decode") or {}).get("tokens_per_s") or 0 for r in mine]
        ax_decode.barh(y, decode, color="tab:blue", label="achieved")
        roof = [r.get("roofline_tokens_per_s") for r in mine]
        visible = [x for x in roof if x and x < 4 * max(decode + [1e-9])]  # a far-off roofline would flatten the bars
        if visible:
            ax_decode.scatter([x if x in visible else np.nan for x in roof], y, marker="|", s=300, color="tab:red",
                              label="roofline")  # fmt: skip
        ax_decode.set_title(f"{model + ': ' if model else ''}decode tokens/s", fontsize=10)
        ax_decode.legend(loc="lower right", fontsize=7)
        height = 0.8 / max(len(lengths), 1)
        for i, n in enumerate(lengths):
            vals = [((r.get("prefill") or {}).get(str(n)) or {}).get("tokens_per_s") or 0 for r in mine]
            ax_prefill.barh(y + (i - (len(lengths) - 1) / 2) * height, vals, height=height, label=f"prompt {n}")
        ax_prefill.set_title(f"{model + ': ' if model else ''}prefill tokens/s", fontsize=10)
        ax_prefill.legend(loc="lower right", fontsize=7)
        for ax in (ax_decode, ax_prefill):
            ax.set_yticks(y)
            ax.set_yticklabels([f"{r['backend']} / {r['variant']}" for r in mine], fontsize=8)
            ax.invert_yaxis()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict, out_dir: str | Path, stem: str = "bench") -> list[Path]:
    """stem.json, stem.md and stem.png in out_dir, each written atomically; the paths written."""
    out_dir = Path(out_dir)
    report = without_machine_paths(_clean(report))
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    write_atomic(paths[0], json.dumps(report, indent=2) + "\n")
    write_atomic(paths[1], markdown_report(report))
    png = chart_png(report)
    if png is not None:
        paths.append(out_dir / f"{stem}.png")
        write_atomic(paths[2], png)
    return paths


def android_report(model: Path, raw: dict, settings: BenchSettings) -> dict:
    rows = []
    for entry in raw["results"]:
        verify = read_verify(str(Path(entry["path"]).parent.parent)).get(entry["variant"]) or {}
        accuracy = {k: verify.get(k) for k in ("top1_agreement", "ppl_increase", "max_abs_logit_diff", "passed")}
        rows.append(entry | {"model": "", "accuracy": accuracy if verify else None})
    add_ratios(rows)
    return {
        "kind": "android",
        "model": portable_path(model),
        "device": raw["device"],
        "machine": {"threads": settings.threads},
        "settings": asdict(settings),
        "results": rows,
    }
