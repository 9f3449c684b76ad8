"""effllm-train: pruning-aware pretraining from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

from effllm.common.cli_args import CliParser
from effllm.common.errors import run_cli
from effllm.training.recipe import (
    QUICKSTART_SOURCE,
    RecipeError,
    TrainConfig,
    add_arguments,
    build_config,
    recipe_names,
)

DESCRIPTION = """\
Pruning-aware pretraining (EfficientLLM): keep pretraining a trained Llama-family source model
while removing its least salient attention heads, FFN channels and hidden channels, until it
reaches --target-params; then continue pretraining the compact model. Writes an HF model
directory (loads with transformers, trust_remote_code), metrics, a prune log, plots and summary.md.

With no arguments: the quickstart recipe (offline, CPU, ~7 minutes on 2 cores): pretrains a small source on
the Python documentation that ships with the interpreter, prunes it to 40%, and prints the
held-out perplexity of source, result and a unigram baseline.

Under torchrun every rank makes the same pruning decisions (checked with --check-decisions).
"""

EPILOG = """examples:
  effllm-train                                   # the quickstart
  effllm-train --recipe smollm-1.7b-to-469m      # the paper's setting (GPUs)
  effllm-train --recipe smollm-1.7b-to-469m --dry-run --world-size 8   # the plan: memory, time; no training
  effllm-train --source HuggingFaceTB/SmolLM-360M --target-params 150M --data corpus/ --tokens 2B --out runs/x
  torchrun --nproc-per-node 8 -m effllm.cli --recipe smollm-1.7b-to-469m
  effllm-train --out runs/x --resume             # continue after a stop or a crash
"""


def parser() -> CliParser:
    from effllm.pruning.config import DEFAULTS_HELP

    p = CliParser(
        prog="effllm-train",
        description=DESCRIPTION + "\nPruning " + DEFAULTS_HELP[0].lower() + DEFAULTS_HELP[1:],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", default="quickstart", help=f"a recipe name {recipe_names()} or a YAML path")
    add_arguments(p)
    plan = p.add_argument_group("planning (--dry-run: print the plan and exit; nothing is trained or written)")
    plan.add_argument(
        "--dry-run", action="store_true",
        help="print shapes, steps, tokens, the pruning schedule, memory per device (DDP and FSDP2) and time; "
        "offline for the sources in effllm.model.known_sources",
    )  # fmt: skip
    p.add_argument(
        "--tokenize-only", action="store_true",
        help="tokenize --data into <out>/data with the source's tokenizer and exit (tokenize once on a CPU "
        "machine; the run started later with the same --out, or any run given --data <out>/data, reuses it)",
    )  # fmt: skip
    plan.add_argument("--world-size", type=int, default=None,
                      help="GPUs to plan for (default: WORLD_SIZE under torchrun, else 1)")  # fmt: skip
    plan.add_argument("--assume-tokens-per-s", type=float, default=None,
                      help="training throughput of all GPUs together, for the time estimate (default: from --mfu)")  # fmt: skip
    plan.add_argument("--plan-device", choices=["auto", "cpu", "gpu"], default="auto",
                      help="plan a CPU run (fp32, resident memory against this machine's RAM, a measured speed) or "
                      "a GPU run (bf16 autocast, --gpu-memory, --gpu-tflops); default auto: gpu where CUDA is "
                      "visible or --world-size > 1, else cpu")  # fmt: skip
    plan.add_argument("--measure-steps", type=int, default=None,
                      help="time this many micro-batches of the source's shapes (random weights) on this machine's "
                      "device and plan with that throughput (default: 1 on a CPU plan, 0 on a GPU plan)")  # fmt: skip
    plan.add_argument("--gpu-tflops", type=float, default=989.0,
                      help="peak dense bf16 TFLOP/s of one GPU (default: 989, an H100 SXM)")  # fmt: skip
    plan.add_argument("--mfu", type=float, default=0.35,
                      help="model FLOP utilization assumed when no throughput is given (default: 0.35)")  # fmt: skip
    plan.add_argument("--gpu-memory", type=float, default=80.0,
                      help="GiB of memory per GPU, to say whether DDP or FSDP2 fits (default: 80)")  # fmt: skip
    return p


def resume_config(args: argparse.Namespace) -> TrainConfig:
    """--resume continues the run stored in --out with its own settings; only bookkeeping flags may change."""
    out = Path(args.out or TrainConfig.out)
    run = out / "run.json"
    if not run.is_file():
        if out.is_dir() and not [p for p in out.iterdir() if p.name not in ("source", "data")]:
            # no run recorded yet (killed while the quickstart source trained, or --tokenize-only): start it
            print(f"{out} holds no run yet: starting it", flush=True)
            return replace(build_config(args.recipe, args), resume=False)
        raise RecipeError(f"--resume: {out} holds no effllm run (no run.json); check --out")
    stored = TrainConfig(**json.loads(run.read_text())["config"])
    from effllm.training.train import VOLATILE

    changeable = {*VOLATILE, "eval_every"}
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is None or f.name in ("resume", "out"):
            continue
        if f.name not in changeable and given != getattr(stored, f.name):
            raise RecipeError(
                f"--resume keeps the run's settings; --{f.name.replace('_', '-')} cannot change ({getattr(stored, f.name)!r} -> {given!r})"
            )
        stored = replace(stored, **{f.name: given})
    return replace(stored, resume=True, overwrite=False)


def train_main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from effllm import quiet_library_logs

    quiet_library_logs()  # before transformers is imported below (run_cli does it too, later)
    if args.dry_run:
        return run_cli("effllm-train", lambda: dry_run(args))
    if args.tokenize_only:
        return run_cli("effllm-train", lambda: tokenize_only(args))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar tracks the run; per-file load/save bars are noise
    from effllm.training import distributed as D

    def body() -> int:
        from effllm.training.train import train

        cfg = resume_config(args) if args.resume else build_config(args.recipe, args)
        if cfg.source == QUICKSTART_SOURCE and not cfg.init_config and not cfg.resume:
            from effllm.training import distill, schedules
            from effllm.training.plan import pruning_config
            from effllm.training.quickstart import build_quickstart_source
            from effllm.training.train import check_out_dir

            check_out_dir(Path(cfg.out), cfg)  # before the source is trained, not after
            pruning_config(cfg)  # bad pruning knobs too: nothing written for a run that cannot start
            schedules.check_config(cfg)
            distill.check_config(cfg)

            cfg = replace(cfg, source=str(build_quickstart_source(cfg)))
        return train(cfg).get("exit_code", 0)

    try:
        return run_cli("effllm-train", body)
    finally:
        D.shutdown_if_initialized()


def tokenize_only(args: argparse.Namespace) -> int:
    """--tokenize-only: the data preparation of a run, without the run."""
    from effllm.common.errors import first_line
    from effllm.data.prepare import prepare_tokens
    from effllm.model.file_checks import BadModelFileError
    from effllm.model.model_dir import load_tokenizer

    cfg = resume_config(args) if args.resume else build_config(args.recipe, args)
    if cfg.source == QUICKSTART_SOURCE and not cfg.init_config:
        raise RecipeError("--tokenize-only needs a --source with a tokenizer (the quickstart trains its own first)")
    where = cfg.source
    if cfg.init_config:
        where = str(Path(cfg.init_config) if Path(cfg.init_config).is_dir() else Path(cfg.init_config).parent)
    try:
        tokenizer = load_tokenizer(where)
    except BadModelFileError as err:
        raise RecipeError(f"cannot load the tokenizer of {where} ({first_line(err)}); check --source") from None
    info = prepare_tokens(
        cfg.data, tokenizer, Path(cfg.out) / "data", heldout_fraction=cfg.heldout_fraction,
        max_tokens=cfg.max_data_tokens, text_field=cfg.text_field, split=cfg.data_split, show_progress=not cfg.quiet,
        num_proc=cfg.num_proc, shard_chars=cfg.shard_chars,
    )  # fmt: skip
    print(f"{info.train_tokens:,} train and {info.heldout_tokens:,} held-out tokens in {info.meta_path.parent}; "
          f"a run with --out {cfg.out}, or any run given --data {info.meta_path.parent}, reads them")  # fmt: skip
    return 0


def dry_run(args: argparse.Namespace) -> int:
    """--dry-run: the run's plan, printed; reads configs only (no weights, no data, no writes)."""
    import os

    from effllm.training.dry_run import format_plan, make_plan

    cfg = resume_config(args) if args.resume else build_config(args.recipe, args)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise RecipeError(f"--world-size {world} is not positive; pass the number of GPUs")
    plan = make_plan(cfg, world_size=world, tokens_per_s=args.assume_tokens_per_s, gpu_tflops=args.gpu_tflops,
                     mfu=args.mfu, gpu_memory_gib=args.gpu_memory, measure_steps=args.measure_steps,
                     device=args.plan_device)  # fmt: skip
    print(format_plan(plan))
    return 0


def main() -> None:
    sys.exit(train_main())


if __name__ == "__main__":
    main()
