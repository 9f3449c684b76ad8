"""Training recipes: one dataclass of every knob, YAML files that set some of them, CLI overrides on top.

Each field carries its --help text, so the CLI, the YAML files and the docs cannot drift apart.
Precedence: dataclass default < recipe YAML < command-line flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from effllm.common.errors import EffllmError

RECIPE_DIR = Path(__file__).parent / "recipes"
QUICKSTART_SOURCE = "builtin:quickstart"  # "pretrain a small source on the embedded corpus first"


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    source: str = _f(
        QUICKSTART_SOURCE,
        "source checkpoint: a local model directory, a GGUF file or a Hugging Face hub id of a Llama/Qwen2/Mistral "
        "model; "
        f"'{QUICKSTART_SOURCE}' first pretrains a small source on the embedded corpus",
    )
    init_config: str | None = _f(
        None, "train from random init with this config.json instead of a source (baseline runs; no pruning needed)"
    )
    target_params: str | None = _f(
        None, "target size, e.g. 469M, 1.1B, 250K, or a fraction of the source such as 0.35; none = no pruning"
    )
    data: list[str] | None = _f(
        None,
        "training text: files (.txt/.md/.jsonl/.parquet), directories, or a Hugging Face dataset id; "
        "default: the embedded Python-docs corpus",
        nargs="+",
    )
    text_field: str = _f("text", "field/column holding the text in JSONL, Parquet and hub datasets")
    data_split: str = _f("train", "split of a Hugging Face dataset")
    max_data_tokens: int | None = _f(None, "cap on tokens read from the data (needed for huge hub datasets)")
    heldout_fraction: float = _f(
        0.02, "fraction of documents held out for evaluation (of a single text file: its last part)"
    )
    num_proc: int = _f(1, "processes that tokenize the data (the token shards are identical for any number)")
    shard_chars: int = _f(
        16 << 20,
        "characters of text per token shard (~4 per token): the unit of parallel tokenization and of its resume",
        parse="count",
    )
    out: str = _f("runs/quickstart", "output directory (model/, checkpoint/, logs, plots, summary.md)")
    # how long
    tokens: int = _f(800_000, "total training tokens (all ranks together), pruning phase included", parse="count")
    prune_start: int = _f(0, "token count at which pruning starts", parse="count")
    prune_tokens: int | None = _f(
        None, "length of the pruning phase in tokens (overrides --prune-fraction)", parse="count"
    )
    prune_fraction: float = _f(
        0.6, "length of the pruning phase as a fraction of --tokens; continued pretraining follows"
    )
    prune_every: int = _f(1, "optimizer steps between prune steps (the paper uses 1 or 2)")
    budget_curve: str = _f(
        "linear",
        "how the parameter budget falls over the pruning phase: linear (the paper) or cubic (front-loaded, "
        "as gradual magnitude pruning)",
        choices=["linear", "cubic"],
    )
    schedule: str = _f(
        "continuous",
        "when groups are removed: continuous (the paper: a little after every --prune-every steps, saliency "
        "from the training gradients), one-shot (a calibration pass of --calibration-batches at --prune-start, "
        "one removal to the target, then every remaining token trains the final architecture) or staged "
        "(--stages one-shot removals spread over the pruning phase, recovery training after each). On a real "
        "source (SmolLM2-135M, bench/results/method_real.md, 2 seeds) continuous beat one-shot by 17% held-out "
        "perplexity at 0.5 of the source and tied at 0.7, hence the default; on a small undertrained source "
        "(bench/results/method.md) one-shot won by 8.5-9.4% at 0.12 and 3.3-3.8% at 0.28: try one-shot below "
        "~0.3. README.md's recommendation table has both",
        choices=["continuous", "one-shot", "staged"],
    )
    calibration_batches: int = _f(
        16, "one-shot and staged: micro-batches of the calibration pass before each removal (not trained on)"
    )
    stages: int = _f(2, "staged: how many removals (each a calibration pass and a removal to an intermediate budget)")
    # knowledge distillation
    distill: bool = _f(
        False,
        "train on forward KL(teacher || student) of the logits (mixed with the LM loss by --distill-weight); the "
        "teacher is the frozen source, or --teacher. Costs one teacher forward per micro-batch "
        "(bench/results/distill_overhead.json). On SmolLM2-135M pruned to 0.5 and 0.7 with 49K tokens it cost 9-23% "
        "in-domain perplexity (past 2 SE in 3 of 4 pairs) and tied on general English (bench/results/method_real.md): "
        "off by default",
    )
    teacher: str | None = _f(
        None, "with --distill: the teacher (model directory, GGUF file or hub id) instead of the source; same tokenizer"
    )
    distill_temperature: float = _f(1.0, "with --distill: softmax temperature T of both logits (the loss is x T^2)")
    distill_weight: float = _f(1.0, "with --distill: loss = w * KD + (1 - w) * LM; 1 is pure distillation")
    # pruning
    granularity: int = _f(
        32,
        "FFN and hidden channels are pruned in blocks of N so widths stay multiples of N. The default 32 is the "
        "block of every quantized export (effllm-export's 8da4w and int4 groups, llama.cpp's q4_0/q8_0 blocks), "
        "so none of them falls back to a wider type; at 95M parameters arbitrary widths made 8da4w read 59 MiB "
        "of weights per token instead of 51 (int8 fallbacks) and llama.cpp q4_0 87 MiB instead of 61 (f16 "
        "fallbacks); SmolLM2-135M pruned to 0.7 reached the same held-out perplexity at 32 as at 1 (62.37 vs "
        "62.63) with q4_0 / q4_k_m files 21% / 17% smaller. 1 prunes single channels, as in the paper",
    )
    shape: str = _f(
        "irregular",
        "irregular: saliency gives every layer its own heads and FFN width (the method). uniform: every layer "
        "loses the same groups (each layer's least salient, priced together), so the result also saves as a "
        "plain Llama/Qwen2 in <out>/model-plain that stock transformers (no trust_remote_code), vLLM and "
        "llama.cpp's llama architecture run; pick it when the target server needs one shape for all layers",
        choices=["irregular", "uniform"],
    )
    weight_update: str = _f("none", "local second-order weight update when a group is removed", choices=["none", "obs"])
    obs_damping: float = _f(0.01, "with --weight-update obs: damping lambda as a fraction of the mean Hessian diagonal")
    ema_beta: float = _f(0.99, "decay of the saliency moving averages (per optimizer step)")
    fisher: str = _f(
        "per_token",
        "Fisher term of the saliency: per_token (element-wise empirical Fisher), group (the group's own "
        "quadratic form, squared summed first-order term) or minibatch (the literal squared mini-batch gradient)",
        choices=["per_token", "group", "minibatch"],
    )
    stem_price: float = _f(
        1.0, "multiplies hidden-channel saliency in selection (< 1 narrows the hidden size earlier; see docs/method.md)"
    )
    min_heads_per_layer: int = _f(0, "floor: query heads kept in every layer (0 lets a layer become FFN-only)")
    min_ffn_per_layer: int = _f(0, "floor: FFN width kept in every layer (0 lets a layer become attention-only)")
    min_hidden_size: int | None = _f(None, "floor: hidden size; default: the pruning engine's default")
    # optimization
    seq_len: int = _f(256, "tokens per training sequence")
    batch_size: int = _f(16, "sequences per micro-batch on each rank")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    lr_schedule: str = _f("cosine", "learning-rate shape after warmup", choices=["cosine", "wsd", "constant"])
    warmup_steps: int = _f(20, "linear warmup steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to norms and biases)")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 disables)")
    seed: int = _f(0, "random seed (data order, init)")
    dtype: str = _f(
        "auto", "compute dtype: auto = bf16 autocast on CUDA, fp32 on CPU", choices=["auto", "fp32", "bf16"]
    )
    compile: bool = _f(False, "torch.compile the model once the pruning phase is over (its shapes change until then)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    # bookkeeping
    eval_every: int = _f(50, "optimizer steps between held-out evaluations")
    eval_windows: int = _f(64, "held-out sequences per evaluation")
    log_every: int = _f(5, "optimizer steps between metrics.jsonl records")
    save_every: int = _f(100, "optimizer steps between checkpoints (also on SIGTERM/SIGINT and at the end)")
    resume: bool = _f(False, "continue the run in --out from its checkpoint, exactly")
    overwrite: bool = _f(False, "replace a different run that already lives in --out")
    check_decisions: bool = _f(False, "debug: compare a hash of every pruning decision across ranks")
    halt_at_step: int | None = _f(None, "debug: send this process SIGTERM after this step (tests preemption)")
    quiet: bool = _f(False, "no progress bar")
    # embedded quickstart source (used only when --source is builtin:quickstart)
    source_tokens: int = _f(1_000_000, "tokens to pretrain the quickstart source", parse="count")
    source_layers: int = _f(4, "quickstart source: layers")
    source_hidden: int = _f(256, "quickstart source: hidden size")
    source_heads: int = _f(8, "quickstart source: query heads (head_dim = hidden/heads)")
    source_kv_heads: int = _f(4, "quickstart source: KV heads")
    source_ffn: int = _f(768, "quickstart source: FFN width")
    source_vocab: int = _f(2048, "quickstart source: tokenizer vocabulary size")

    def __post_init__(self):
        # argparse checks choices only for flags; a YAML recipe or a script building a TrainConfig would otherwise
        # run quietly with another setting (dtype "bfloat16" is not "bf16": the run would train in fp32)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise RecipeError(f"{f.name} {getattr(self, f.name)!r} is not one of {choices}; use one of them")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


class RecipeError(EffllmError):
    """A recipe or flag that cannot be used; the message says how to fix it."""


def recipe_path(name_or_path: str) -> Path:
    """A shipped recipe's name (``smollm-1.7b-to-469m``: dots are part of names, not suffixes) or a YAML path."""
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if name_or_path in recipe_names():
        return shipped
    return Path(name_or_path)


def load_recipe(name_or_path: str) -> dict:
    path = recipe_path(name_or_path)
    if not path.is_file():
        raise RecipeError(f"no recipe {name_or_path!r}; use one of {recipe_names()} or a path to a YAML file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RecipeError(f"recipe {path} sets unknown keys {unknown}; see effllm-train --help for the valid ones")
    return values


def _parse_count(text: str) -> int:
    from effllm.model.params import parse_count

    try:
        return parse_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are None so that only given flags override the recipe."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        help_text = f"{meta['help']} (default: {f.default})".replace("%", "%%")  # argparse formats help with %
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kwargs: dict = {"default": None, "help": help_text}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "nargs" in meta:
            kwargs["nargs"] = meta["nargs"]
        if meta.get("parse") == "count":
            kwargs["type"] = _parse_count
        elif "int" in str(f.type):
            kwargs["type"] = int
        elif "float" in str(f.type):
            kwargs["type"] = float
        parser.add_argument(flag, **kwargs)


def build_config(recipe: str, args: argparse.Namespace) -> TrainConfig:
    values = load_recipe(recipe)
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    for key in [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("parse") == "count"]:
        if isinstance(values.get(key), str):
            values[key] = _parse_count(values[key])
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    config = TrainConfig(**values)
    if config.target_params is not None:
        config.target_params = str(config.target_params)
    return config
