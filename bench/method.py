"""The method study: does pruning *during* pretraining beat pruning once and training afterwards?

One corpus with whole held-out documents, one source S pretrained here until its held-out loss
flattens, then, from that same S, at the same final size and the same training tokens:
  (i)   pruning-aware pretraining S -> T (effllm-train's defaults),
  (iii) one-shot pruning of S to T with the same saliency on K calibration batches (LLM-Pruner
        style), then recovery training,
for targets 0.12, 0.28 and 0.5 of S and three token budgets, 3 seeds per cell (the seed changes
the data order and every run's randomness). Around the paper's ratio (0.28) at the middle budget:
(i) with pruning phases of 0.3 and 0.9 of the budget, (i) with a front-loaded (cubic) budget
curve, (iii) with first-order Taylor scores, (ii) training from scratch with (i)'s architecture
and with a uniform one of equal size, and (i)/(iii) at 0.12 with hidden channels priced at 0.3 of
their estimated saliency (the overpricing bench/stem_saliency.py measured on S).

Sizes are matched: (iii) is pruned to exactly the parameter count (i) reached in the same cell
and seed, so every compared pair is within one small group (< 1%) of each other.

    apt-get install linux-doc-6.1          # the default corpus (bench/method_corpus.py)
    python bench/method.py                 # the CPU study, ~90 min on 2 idle cores, resumes finished cells
    python bench/method.py --preset gpu    # one GPU, bf16, larger source (give it a bigger --data)
    python bench/method.py --preset smoke  # seconds; what the tests run
    python bench/method.py --preset real   # the same question on a real source (bench/method_real.py)

Writes bench/results/method.{json,md} and the plots beside them (--results elsewhere). A winner is
called only where the gap between the means exceeds two standard errors; otherwise "tie".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # method_corpus, method_report beside this file

from method_grid import ONESHOT, PAP, PRESETS, Cell, Preset, build_grid, source_config, stem_price  # noqa: E402
from method_real_grid import REAL_PRESETS  # noqa: E402

RESULTS = Path(__file__).parent / "results"


# ---- the shared context of one study ----------------------------------------------------------
@dataclass
class Study:
    root: Path
    preset: Preset
    data: list[str] | None
    source_dir: Path | None = None
    data_dir: Path | None = None
    tokens: object = None  # effllm.data.prepare.TokenData of data_dir, prepared once by prepare()
    source_params: int = 0
    base: dict = field(default_factory=dict)  # TrainConfig fields every run shares

    def train_config(self, **changes):
        from effllm.training.recipe import TrainConfig

        return TrainConfig(**{**self.base, **changes})


def make_base(study: Study) -> dict:
    p = study.preset
    return dict(
        data=study.data, seq_len=p.seq_len, batch_size=p.batch_size, lr=p.lr, warmup_steps=p.warmup_steps,
        eval_every=10**9, eval_windows=10**6, heldout_fraction=p.heldout_fraction, save_every=10**9, quiet=True,
        overwrite=True, log_every=5, granularity=1,  # single channels: the study's published results used them
    )  # fmt: skip


def finished_run(cfg) -> dict | None:
    """The results of an earlier, completed run with exactly these settings (the study resumes)."""
    out = Path(cfg.out)
    if not (out / "results.json").is_file() or not (out / "run.json").is_file():
        return None
    stored = json.loads((out / "run.json").read_text())["config"]
    from effllm.common.errors import EffllmError

    try:  # settings added since that run take their defaults, which is what the run used
        stored = asdict(type(cfg)(**stored))
    except (TypeError, EffllmError):  # a setting since removed, or a value no longer valid: not this run
        return None
    if json.loads(json.dumps(stored, default=str)) != json.loads(json.dumps(asdict(cfg), default=str)):
        return None
    return json.loads((out / "results.json").read_text())


def run_training(study: Study, cfg) -> dict:
    """train(cfg), reusing a finished identical run and the study's one tokenized copy of the data."""
    from effllm.training.train import train

    result = finished_run(cfg)
    if result is not None:
        return result
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    link = out / "data"
    if study.data_dir is not None and not link.exists():
        link.symlink_to(study.data_dir.resolve(), target_is_directory=True)  # same tokens, tokenized once
    result = train(cfg)
    if result.get("exit_code"):
        raise SystemExit(f"{cfg.out}: training stopped (exit code {result['exit_code']}); rerun to resume the study")
    return result


def prepare(study: Study) -> dict:
    """Corpus, tokenizer, the tokenized data and the trained source S (all reused when present)."""
    import torch

    from effllm import EfficientLLMConfig
    from effllm.data.prepare import prepare_tokens
    from effllm.model.params import count_parameters
    from effllm.model.tokenizer import train_ascii_bpe
    from effllm.training.quickstart import tokenizer_texts

    p = study.preset
    corpus_name = "your --data"
    if study.data is None:
        corpus_name = {"linux-doc": "the Linux kernel's documentation (Debian linux-doc)",
                       "embedded": "the quickstart's Python docs"}[p.corpus]  # fmt: skip
    if study.data is None and p.corpus == "linux-doc":
        from method_corpus import write_corpus_jsonl

        study.data = [str(write_corpus_jsonl(study.root / "corpus" / "linux-doc.jsonl"))]
    study.base = make_base(study)
    init_dir = study.root / "S-init"
    if not (init_dir / "tokenizer.json").is_file():
        torch.manual_seed(0)
        tokenizer = train_ascii_bpe(tokenizer_texts(study.train_config()), vocab_size=p.vocab)
        config = source_config(p, tokenizer)
        init_dir.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    study.data_dir = study.root / "data"
    cfg = study.train_config()
    info = prepare_tokens(cfg.data, tokenizer, study.data_dir, heldout_fraction=p.heldout_fraction, show_progress=True)
    study.tokens = info
    steps = math.ceil(p.source_tokens / (p.seq_len * p.batch_size))
    source_cfg = study.train_config(
        init_config=str(init_dir), tokens=p.source_tokens, out=str(study.root / "S"), seed=0,
        eval_every=max(1, steps // p.source_evals), eval_windows=128, warmup_steps=max(p.warmup_steps, steps // 50),
    )  # fmt: skip
    print(f"source S: pretraining on {p.source_tokens:,} tokens (reused when finished)", flush=True)
    t0 = time.perf_counter()
    result = run_training(study, source_cfg)
    study.source_dir = Path(result["model_dir"])
    evals = [json.loads(line) for line in (study.root / "S" / "evals.jsonl").read_text().splitlines() if line]
    config = EfficientLLMConfig.from_pretrained(study.source_dir)
    count = count_parameters(config)
    embedding = count.embedding + count.lm_head
    facts = {
        "corpus": {
            "name": corpus_name,
            "train_tokens": info.train_tokens, "heldout_tokens": info.heldout_tokens,
            "documents": {k: v for k, v in json.loads(info.meta_path.read_text()).items() if k.endswith("_documents")},
        },
        "source": {
            "params": count.total, "embedding_params": embedding, "embedding_fraction": embedding / count.total,
            "tokens": result["tokens"], "epochs": result["tokens"] / max(info.train_tokens, 1),
            "heldout_ppl": result["final_heldout_ppl"], "layers": p.layers, "hidden": p.hidden,
            "heads": p.heads, "kv_heads": p.kv_heads, "ffn": p.ffn, "vocab": len(tokenizer),
            "seconds": time.perf_counter() - t0, "train_seconds": result["train_seconds"],
            "curve": [{"tokens": e["tokens"], "heldout_loss": e["heldout_loss"]} for e in evals],
        },
    }  # fmt: skip
    print(
        f"source S: {count.total:,} parameters (embedding {embedding / count.total:.1%}), "
        f"{result['tokens']:,} tokens, held-out ppl {result['final_heldout_ppl']:.2f}",
        flush=True,
    )
    return facts


# ---- one cell ---------------------------------------------------------------------------------
def one_shot_prune_source(study: Study, cell: Cell, target_params: int, out: Path) -> Path:
    """Prune S to ``target_params`` at once from K calibration batches (LLM-Pruner style)."""
    import torch
    from transformers import AutoTokenizer

    from effllm import EfficientLLMForCausalLM
    from effllm.common.fileio import staged_dir
    from effllm.data.token_batches import TokenBatches
    from effllm.pruning import PruningConfig, one_shot_prune

    pruned = out / "pruned"
    marker = pruned / "oneshot.json"
    settings = {"target_params": target_params, "variant": cell.variant, "seed": cell.seed}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return pruned
    p = study.preset
    tokenizer = AutoTokenizer.from_pretrained(study.source_dir)
    info = study.tokens
    stream = TokenBatches(info.train_path, info.dtype, p.seq_len, p.batch_size, seed=10_000 + cell.seed)
    torch.manual_seed(cell.seed)
    model = EfficientLLMForCausalLM.from_pretrained(study.source_dir, dtype=torch.float32)
    batches = [stream.next_batch() for _ in range(p.calib_batches)]
    pruning = PruningConfig(
        granularity=1,  # as in make_base
        taylor_order=1 if cell.variant == "first-order" else 2,
        stem_price=stem_price(cell),
    )
    one_shot_prune(model, batches, target_params, pruning)
    with staged_dir(pruned) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "oneshot.json").write_text(json.dumps(settings))
    return pruned


def uniform_config_like(source, target_params: int):
    """A human-designed uniform model of about target_params: the source's depth and head_dim, with
    hidden size, heads and FFN width scaled down together (FFN kept at the source's ratio)."""
    from effllm import EfficientLLMConfig
    from effllm.model.params import count_parameters

    heads, kv, ffn = source.layer_shapes()[0]
    # FFN widths in steps of 8 (what a designer would pick); steps of 1 where a toy size needs them
    for ffn_step in (8, 1):
        best = None
        for hidden in range(16, source.hidden_size + 1, 8):
            scale = hidden / source.hidden_size
            h = max(1, round(heads * scale))
            k = max(1, min(h, round(kv * scale)))
            while h % k:
                k -= 1
            for f in range(ffn_step, 2 * ffn + 1, ffn_step):
                cfg = EfficientLLMConfig(**{**source.to_dict(), "per_layer_config": None, "hidden_size": hidden,
                                            "num_attention_heads": h, "num_key_value_heads": k, "intermediate_size": f})  # fmt: skip
                gap = abs(count_parameters(cfg).total - target_params)
                # closest size first, then the FFN ratio nearest the source's
                rank = (gap > 0.01 * target_params, abs(f / hidden - ffn / source.hidden_size), gap)
                if best is None or rank < best[0]:
                    best = (rank, cfg)
        if not best[0][0]:
            break
    return best[1]


def save_init(config, tokenizer_dir: Path, path: Path) -> str:
    from transformers import AutoTokenizer

    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


def run_cell(study: Study, cell: Cell, reference: dict | None) -> dict:
    """Train one cell; ``reference`` is the finished (i) row of the same target, budget and seed."""
    from effllm import EfficientLLMConfig

    out = study.root / "runs" / cell.key
    source_params = study.source_params
    target = int(round(cell.target * source_params))
    cfg_kw = dict(tokens=cell.budget, seed=cell.seed, out=str(out))
    if cell.method == PAP:
        extra = {
            "phase0.3": {"prune_fraction": 0.3},
            "phase0.9": {"prune_fraction": 0.9},
            "cubic": {"budget_curve": "cubic"},
        }.get(cell.variant, {"stem_price": stem_price(cell)} if cell.variant.startswith("stem-price") else {})
        cfg = study.train_config(source=str(study.source_dir), target_params=str(target), **cfg_kw, **extra)
    elif cell.method == ONESHOT:
        matched = reference["params"]  # exactly (i)'s final size: the pair differs by < one group
        pruned = one_shot_prune_source(study, cell, matched, out)
        cfg = study.train_config(source=str(pruned), **cfg_kw)
    else:
        source = EfficientLLMConfig.from_pretrained(study.source_dir)
        if cell.variant == "auto-arch":
            arch = EfficientLLMConfig.from_pretrained(reference["model_dir"])
        else:
            arch = uniform_config_like(source, reference["params"])
        init = save_init(arch, study.source_dir, out / "init")
        cfg = study.train_config(init_config=init, **cfg_kw)
    t0 = time.perf_counter()
    result = run_training(study, cfg)
    return {
        **asdict(cell), "key": cell.key, "params": result["final_params"], "tokens": result["tokens"],
        "heldout_ppl": result["final_heldout_ppl"], "start_ppl": result["source_heldout_ppl"],
        "layer_shapes": result["layer_shapes"], "hidden_size": result["hidden_size"],
        "parameters": result["parameters"], "model_dir": result["model_dir"], "seconds": time.perf_counter() - t0,
        "train_seconds": result["train_seconds"], "target_params": target,
    }  # fmt: skip


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_stage(study: Study, cells: list[Cell], rows: dict, workers: int, started: float, total: int) -> None:
    """Run cells (each needing its reference row, if any, already in ``rows``), ``workers`` at a time."""
    threads = max(1, (os.cpu_count() or 2) // workers)
    todo = [c for c in cells if c.key not in rows]

    def report(cell: Cell, row: dict) -> None:
        rows[cell.key] = row
        print(
            f"[{(time.perf_counter() - started) / 60:5.1f} min] {len(rows):3d}/{total} {cell.key}: "
            f"{row['params']:,} params, held-out ppl {row['heldout_ppl']:.2f} ({row['seconds']:.0f} s)",
            flush=True,
        )

    refs = {c.key: rows.get(c.reference().key) if c.method != PAP else None for c in todo}
    if workers <= 1:
        import torch

        before = torch.get_num_threads()
        _worker_init(threads)
        try:
            for cell in todo:
                report(cell, run_cell(study, cell, refs[cell.key]))
        finally:
            torch.set_num_threads(before)  # a caller in the same process (a test) keeps its setting
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:  # fmt: skip
        futures = {pool.submit(run_cell, study, c, refs[c.key]): c for c in todo}
        for future in as_completed(futures):
            report(futures[future], future.result())


# ---- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    from effllm.common.errors import run_cli

    return run_cli("method.py", lambda: _main(argv))


def _main(argv) -> int:
    from effllm.model.params import count_parameters

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS) + sorted(REAL_PRESETS), default="cpu",
                   help="study size (default: cpu); real, real-gpu, real-smoke: the study on a real source "
                   "(bench/method_real.py)")  # fmt: skip
    p.add_argument("--data", nargs="+", help="your own corpus (any effllm-train --data); default: the preset's")
    p.add_argument("--source", help="real presets: S (model directory, GGUF file or hub id); default: the preset's")
    p.add_argument("--general", nargs="+", help="real presets: the general-English held-out text; default: fortunes")
    p.add_argument("--out", help="working directory for the runs (default: runs/method-<preset>)")
    p.add_argument("--results", default=str(RESULTS), help="where method.{json,md} and the plots go")
    p.add_argument("--workers", type=int, help="cells run side by side (default: the preset's)")
    p.add_argument("--stage", choices=["source", "all"], default="all", help="'source' stops after S")
    args = p.parse_args(argv)
    if args.preset in REAL_PRESETS:
        from method_real import run_real_study

        root = Path(args.out or f"runs/method-{args.preset}")
        return run_real_study(args.preset, root, Path(args.results), args.source, args.data, args.general)
    preset = PRESETS[args.preset]
    if args.workers:
        preset = replace(preset, workers=args.workers)
    root = Path(args.out or f"runs/method-{args.preset}")
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    study = Study(root=root, preset=preset, data=args.data)
    facts = prepare(study)
    from effllm import EfficientLLMConfig

    study.source_params = count_parameters(EfficientLLMConfig.from_pretrained(study.source_dir)).total
    if args.stage == "source":
        return 0
    cells = build_grid(preset)
    print(f"{len(cells)} runs: {preset.why}", flush=True)
    rows: dict[str, dict] = {}
    first = [c for c in cells if c.method == PAP]
    run_stage(study, first, rows, preset.workers, started, len(cells))
    run_stage(study, [c for c in cells if c.method != PAP], rows, preset.workers, started, len(cells))
    from method_report import write_results

    write_results(Path(args.results), cells, rows, facts, preset, args, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
