"""Are hidden (stem) channels priced right? Saliency estimates against the measured loss increase.

Selection compares groups of different types by density = saliency / parameters removed, so a
type whose saliency is overestimated relative to the others is never pruned. Our method runs never
pruned the hidden size, while the paper's run prunes it by ~42%. This script measures, on a trained
model, for every attention group, a sample of FFN channels and a sample of stem channels:

  true      the held-out loss increase when the group is removed (on fixed held-out windows)
  per_token the element-wise estimate: sum over the group's weights of -g*w + N/2 (g*w)^2
            (the diagonal of the empirical Fisher; effllm's estimate before this study)
  group     the group's own quadratic form: -(sum g*w) + N/2 (sum g*w)^2, i.e. w_G^T F w_G with the
            full empirical Fisher block of the group, cross terms included

both accumulated over the same K calibration batches at fixed weights. For each estimate it
reports, per type, the rank correlation with the truth and the calibration (median of
estimate / truth): a good estimate for *selection across types* has similar calibration for all
three types. Writes bench/results/stem_saliency.{json,md,png}.

    python bench/stem_saliency.py --study runs/method-cpu      # after bench/method.py --stage source
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
ESTIMATES = ("per_token", "group")
TYPES = ("attention", "ffn", "stem")


@torch.no_grad()
def heldout_loss(model, windows: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for batch in windows:
        logits = model(batch[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


def accumulate_saliency(model, batches: list[torch.Tensor]) -> dict[str, dict]:
    """Mean-mode saliency of every unit under each estimate, from the same backward passes."""
    from effllm.pruning.saliency import SaliencyTracker

    trackers = {name: SaliencyTracker(model, mode="mean", fisher=name) for name in ESTIMATES}
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        logits = model(batch[:, :-1], use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        for tracker in trackers.values():
            tracker.update(tokens=batch[:, 1:].numel())
    model.zero_grad(set_to_none=True)
    scores = {name: t.scores() for name, t in trackers.items()}
    for t in trackers.values():
        t.close()
    return scores


def sample_units(model, per_type: int, rng: np.random.Generator) -> list[tuple[str, int | None, int]]:
    """Every attention group, and ``per_type`` random FFN channels (spread over layers) and stem channels."""
    shapes = model.config.layer_shapes()
    units = [("attention", i, j) for i, (_, k, _) in enumerate(shapes) for j in range(k)]
    ffn = [("ffn", i, j) for i, (_, _, f) in enumerate(shapes) for j in range(f)]
    units += [ffn[i] for i in rng.choice(len(ffn), size=min(per_type, len(ffn)), replace=False)]
    d = model.config.hidden_size
    units += [("stem", None, int(c)) for c in rng.choice(d, size=min(per_type, d), replace=False)]
    return units


def removal_loss(model, unit, windows, base: float) -> float:
    """Held-out loss increase when this one unit is removed (surgery on a copy of the model)."""
    from effllm.pruning import Pruner, PruningConfig

    trial = copy.deepcopy(model)
    pruner = Pruner(trial, PruningConfig(granularity=1))  # one unit at a time
    pruner.remove_groups([unit])
    pruner.close()
    return heldout_loss(trial, windows) - base


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def analyse(rows: list[dict], sizes: dict[str, int]) -> dict:
    out = {}
    for est in ESTIMATES:
        per_type = {}
        for kind in TYPES:
            rs = [r for r in rows if r["type"] == kind]
            true = np.array([r["true"] for r in rs])
            guess = np.array([r[est] for r in rs])
            pos = true > 0
            per_type[kind] = {
                "n": len(rs),
                "spearman": spearman(guess, true) if len(rs) > 2 else float("nan"),
                "calibration_median": float(np.median(guess[pos] / true[pos])) if pos.any() else float("nan"),
                "true_density_median": float(np.median(true) / sizes[kind]),
                "estimated_density_median": float(np.median(guess) / sizes[kind]),
                "estimated_density_min": float(np.min(guess) / sizes[kind]),
                "true_density_min": float(np.min(true) / sizes[kind]),
            }
        cal = {k: per_type[k]["calibration_median"] for k in TYPES}
        out[est] = {"types": per_type, "stem_over_ffn_calibration": cal["stem"] / cal["ffn"],
                    "stem_over_attention_calibration": cal["stem"] / cal["attention"]}  # fmt: skip
    return out


def plot(rows: list[dict], sizes: dict[str, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ESTIMATES), figsize=(11, 4.6), sharey=True)
    colors = {"attention": "tab:blue", "ffn": "tab:orange", "stem": "tab:green"}
    for ax, est in zip(axes, ESTIMATES):
        for kind in TYPES:
            rs = [r for r in rows if r["type"] == kind]
            x = [max(r["true"], 1e-9) / sizes[kind] for r in rs]
            y = [max(r[est], 1e-12) / sizes[kind] for r in rs]
            ax.scatter(x, y, s=14, alpha=0.7, color=colors[kind], label=f"{kind} ({sizes[kind]:,} params/group)")
        lo, hi = ax.get_xlim()
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.plot([1e-13, 1e-3], [1e-13, 1e-3], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("measured loss increase per parameter removed")
        ax.set_title({"per_token": "element-wise Fisher (before)", "group": "group Fisher (after)"}[est])
    axes[0].set_ylabel("estimated saliency per parameter (density)")
    axes[0].legend(fontsize=8)
    fig.suptitle("What selection sees vs what removal costs (one point per group)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from effllm import EfficientLLMForCausalLM
    from effllm.data.prepare import prepare_tokens
    from effllm.data.token_batches import TokenBatches, evaluate_batches
    from effllm.pruning.groups import ModelShapes

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from method_grid import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="runs/method-cpu", help="a method study's directory (its S and data)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="the study's preset")
    p.add_argument("--calib-batches", type=int, default=32, help="batches the saliency is averaged over")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows the true loss is measured on")
    p.add_argument("--per-type", type=int, default=40, help="FFN and stem channels sampled")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    study = Path(args.study)
    model_dir = study / "S" / "model"
    model = EfficientLLMForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    corpus = study / "corpus" / "linux-doc.jsonl"
    preset = PRESETS[args.preset]
    data = prepare_tokens([str(corpus)] if corpus.is_file() else None, AutoTokenizer.from_pretrained(model_dir),
                          study / "data", heldout_fraction=preset.heldout_fraction, show_progress=False)  # fmt: skip
    if not data.reused:
        print("warning: the study's tokenized data was not reused; check --study/--preset", file=sys.stderr)
    stream = TokenBatches(data.train_path, data.dtype, args.seq_len, args.batch_size, seed=123)
    batches = [stream.next_batch() for _ in range(args.calib_batches)]
    windows = list(evaluate_batches(data.heldout_path, data.dtype, args.seq_len, max_windows=args.eval_windows))
    scores = accumulate_saliency(model, batches)
    base = heldout_loss(model, windows)
    shapes = ModelShapes.from_config(model.config)
    sizes = {"attention": shapes.attention_size(0), "ffn": shapes.ffn_size(0, 1), "stem": shapes.stem_size(1)}
    rows = []
    units = sample_units(model, args.per_type, np.random.default_rng(0))
    for n, (kind, layer, index) in enumerate(units):
        row = {"type": kind, "layer": layer, "index": index,
               "true": removal_loss(model, (kind, layer, index), windows, base)}  # fmt: skip
        for est in ESTIMATES:
            s = scores[est]
            row[est] = float(s["stem"][index] if kind == "stem" else s[kind][layer][index])
        rows.append(row)
        print(f"{n + 1}/{len(units)} {kind} {layer} {index}: true {row['true']:.3e}, "
              f"per_token {row['per_token']:.3e}, group {row['group']:.3e}", flush=True)  # fmt: skip
    result = {"model": "the method study's source S", "base_loss": base, "sizes": sizes, "rows": rows,
              "analysis": analyse(rows, sizes), "args": {k: v for k, v in vars(args).items() if k not in ("results", "study")}}  # fmt: skip
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stem_saliency.json").write_text(json.dumps(result, indent=1))
    plot(rows, sizes, out / "stem_saliency.png")
    lines = [
        f"Saliency vs measured loss increase on a trained model ({len(rows)} groups; held-out loss {base:.3f} "
        f"on {args.eval_windows} windows; saliency from {args.calib_batches} batches).",
        "",
        "| estimate | type | Spearman | calibration (median est./true) | est. density median | true density median |",
        "|---|---|---|---|---|---|",
    ]
    for est in ESTIMATES:
        for kind in TYPES:
            a = result["analysis"][est]["types"][kind]
            lines.append(f"| {est} | {kind} | {a['spearman']:.2f} | {a['calibration_median']:.3g} | "
                         f"{a['estimated_density_median']:.3g} | {a['true_density_median']:.3g} |")  # fmt: skip
    for est in ESTIMATES:
        a = result["analysis"][est]
        lines.append(f"\n{est}: stem calibration / FFN calibration = {a['stem_over_ffn_calibration']:.3g}, "
                     f"stem / attention = {a['stem_over_attention_calibration']:.3g}")  # fmt: skip
    (out / "stem_saliency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(math.isfinite(r["true"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
