"""The end-of-run report: PNG plots and summary.md, for people (results.json is for machines)."""

from __future__ import annotations

from pathlib import Path

from effllm.model.params import architecture_summary, format_count


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def count_label(value: float, _pos=None) -> str:
    """An axis tick for a count: 0, 950, 200K, 1.2M, 3B (three significant digits at most)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _count_ticks(axis) -> None:
    """Count tick labels on a matplotlib axis: plain ScalarFormatter writes 800000 (labels that run
    into each other) or an offset like 1e6 that is easy to miss."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(count_label))


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_params_by_type(metrics: list[dict], evals: list[dict], path: Path) -> None:
    """Parameters per group type vs tokens: the shape of the paper's Fig. A0 (right)."""
    _save(params_by_type_figure(metrics, evals), path)


def params_by_type_figure(metrics: list[dict], evals: list[dict]):
    plt = _plt()
    points = sorted([*evals, *metrics], key=lambda r: r["tokens"])
    tokens = [r["tokens"] for r in points]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("attention_params", "attention"), ("ffn_params", "FFN"), ("embedding_params", "embedding")):
        ax.plot(tokens, [r[key] for r in points], label=label)
    ax.plot(tokens, [r["params"] for r in points], label="total", color="black", linewidth=2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("parameters")
    ax.set_title("parameters per group type")
    ax.legend()
    first = points[0]
    for key, label in (("heads", "attention heads"), ("ffn_width", "FFN channels"), ("hidden_size", "hidden size")):
        ax2.plot(tokens, [r[key] / max(first[key], 1) for r in points], label=label)
    ax2.set_xlabel("training tokens")
    ax2.set_ylabel("fraction of the source kept")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("retained ratio per group type")
    ax2.legend()
    for axis in (ax.xaxis, ax.yaxis, ax2.xaxis):
        _count_ticks(axis)
    return fig


def plot_architecture(config, path: Path) -> None:
    """Heads and FFN width per layer of the final model."""
    _save(architecture_figure(config), path)


def architecture_figure(config):
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    shapes = config.layer_shapes()
    layers = range(len(shapes))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    ax1.bar(layers, [h for h, _, _ in shapes], label="query heads", color="tab:blue")
    ax1.bar(layers, [k for _, k, _ in shapes], label="KV heads", color="tab:orange", width=0.5)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("heads")
    ax1.set_title("attention heads per layer")
    ax1.legend()
    ax2.bar(layers, [f for _, _, f in shapes], color="tab:green")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("FFN width")
    ax2.set_title(f"FFN width per layer (hidden size {config.hidden_size})")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are 0, 1, 2..., never 0.5
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # and so are head counts and widths
    return fig


def plot_loss(metrics: list[dict], evals: list[dict], path: Path) -> None:
    _save(loss_figure(metrics, evals), path)


def loss_figure(metrics: list[dict], evals: list[dict]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["tokens"] for r in metrics], [r["loss"] for r in metrics], label="train loss")
    ax.plot([r["tokens"] for r in evals], [r["heldout_loss"] for r in evals], "o-", label="held-out loss")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    _count_ticks(ax.xaxis)
    return fig


def write_report(
    out: Path, result: dict, metrics: list[dict], evals: list[dict], prune_log: list[dict], config
) -> None:
    if metrics:
        plot_params_by_type(metrics, evals, out / "params_by_type.png")
        plot_loss(metrics, evals, out / "loss.png")
    plot_architecture(config, out / "architecture.png")
    removed = {}
    for r in prune_log:
        removed[r["type"]] = removed.get(r["type"], 0) + 1
    speed = ", ".join(f"{k} {v:,.0f} tok/s" for k, v in result["tokens_per_s_by_phase"].items())
    lines = [
        "# effllm-train run",
        "",
        f"Source: `{result['source']}` ({format_count(result['source_params'])} parameters). "
        f"Result: {format_count(result['final_params'])} parameters "
        + (f"(target {format_count(result['target_params'])}). " if result["target_params"] else ". ")
        + f"{result['tokens']:,} training tokens in {result['steps']} steps; {speed}.",
        "",
        "| held-out perplexity | value |",
        "|---|---|",
        f"| source (before training) | {result['source_heldout_ppl']:.2f} |",
        f"| result | {result['final_heldout_ppl']:.2f} |",
        f"| unigram baseline | {result['unigram_heldout_ppl']:.2f} |",
        "",
        f"Removed groups: {', '.join(f'{n} {t}' for t, n in sorted(removed.items())) or 'none'} "
        "(one line each in [prune_log.jsonl](prune_log.jsonl)).",
        "",
        "![parameters per group type](params_by_type.png)" if metrics else "",
        "",
        "![final architecture](architecture.png)",
        "",
        "![loss](loss.png)" if metrics else "",
        "",
        "```",
        architecture_summary(config),
        "```",
        "",
        "Files: [model/](model/) (`import effllm`, then `AutoModelForCausalLM.from_pretrained(dir)`; the "
        "tokenizer alone: `PreTrainedTokenizerFast.from_pretrained(dir)`), [results.json](results.json), "
        "[metrics.jsonl](metrics.jsonl), [evals.jsonl](evals.jsonl), [prune_log.jsonl](prune_log.jsonl).",
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))
