"""effllm-train: pruning-aware pretraining from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

from .recipe import QUICKSTART_SOURCE, RecipeError, TrainConfig, add_arguments, build_config, recipe_names

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
  effllm-train --source HuggingFaceTB/SmolLM-360M --target-params 150M --data corpus/ --tokens 2B --out runs/x
  torchrun --nproc-per-node 8 -m effllm.cli --recipe smollm-1.7b-to-469m
  effllm-train --out runs/x --resume             # continue after a stop or a crash
"""


def parser() -> argparse.ArgumentParser:
    from .pruning.config import DEFAULTS_HELP

    p = argparse.ArgumentParser(
        prog="effllm-train",
        description=DESCRIPTION + "\nPruning " + DEFAULTS_HELP[0].lower() + DEFAULTS_HELP[1:],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", default="quickstart", help=f"a recipe name {recipe_names()} or a YAML path")
    add_arguments(p)
    return p


def resume_config(args: argparse.Namespace) -> TrainConfig:
    """--resume continues the run stored in --out with its own settings; only bookkeeping flags may change."""
    out = Path(args.out or TrainConfig.out)
    run = out / "run.json"
    if not run.is_file():
        raise RecipeError(f"--resume: {out} holds no effllm run (no run.json); check --out")
    stored = TrainConfig(**json.loads(run.read_text())["config"])
    changeable = {"quiet", "halt_at_step", "check_decisions", "save_every", "log_every", "eval_every"}
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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar tracks the run; per-file load/save bars are noise
    from . import distributed as D
    from .train import TrainError, train

    try:
        cfg = resume_config(args) if args.resume else build_config(args.recipe, args)
        if cfg.source == QUICKSTART_SOURCE and not cfg.init_config and not cfg.resume:
            from .quickstart import build_quickstart_source
            from .train import check_out_dir

            check_out_dir(Path(cfg.out), cfg)  # before the source is trained, not after

            cfg = replace(cfg, source=str(build_quickstart_source(cfg)))
        result = train(cfg)
    except (RecipeError, TrainError) as err:
        print(f"effllm-train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("effllm-train: interrupted", file=sys.stderr)
        return 130
    finally:
        D.shutdown_if_initialized()
    return result.get("exit_code", 0)


def main() -> None:
    sys.exit(train_main())


if __name__ == "__main__":
    main()
