"""The embedded quickstart source: a small Llama-style model pretrained here, offline, on the
Python-docs corpus, so that `effllm-train` with no arguments has a trained model to prune.

It is cached in <out>/source and reused while its settings are unchanged.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from effllm.model.configuration_effllm import EfficientLLMConfig
from effllm.training import distributed as D
from effllm.training.recipe import TrainConfig


def source_settings(cfg: TrainConfig) -> dict:
    keys = ("source_tokens", "source_layers", "source_hidden", "source_heads", "source_kv_heads", "source_ffn",
            "source_vocab", "data", "seq_len", "batch_size", "seed", "heldout_fraction", "max_data_tokens")  # fmt: skip
    return {k: getattr(cfg, k) for k in keys}


def tokenizer_texts(cfg: TrainConfig, max_chars: int = 20_000_000):
    """Text to train the quickstart tokenizer on: the run's data (the embedded corpus by default), first ~20 MB."""
    from effllm.data.sources import iter_pieces, resolve_sources

    seen = 0
    for source in resolve_sources(cfg.data, text_field=cfg.text_field):
        for text, _ in iter_pieces(source, text_field=cfg.text_field, split=cfg.data_split):
            yield text
            seen += len(text)
            if seen >= max_chars:
                return


def build_quickstart_source(cfg: TrainConfig) -> Path:
    """Train (or reuse) the quickstart source; returns its model directory."""
    from effllm.data.sources import DataError
    from effllm.model.tokenizer import train_ascii_bpe
    from effllm.training.train import TrainError, train

    info = D.init_distributed()
    src_out = Path(cfg.out) / "source"
    settings = source_settings(cfg)
    marker = src_out / "source_settings.json"
    if (src_out / "model" / "config.json").is_file() and marker.is_file():
        if json.loads(marker.read_text()) == json.loads(json.dumps(settings)):
            if info.is_main:
                print(f"reusing the quickstart source in {src_out / 'model'}", flush=True)
            return src_out / "model"
    init_dir = src_out / "init"
    if info.is_main:
        print("pretraining the quickstart source model (cached for later runs)", flush=True)
        try:
            tokenizer = train_ascii_bpe(tokenizer_texts(cfg), vocab_size=cfg.source_vocab)
        except DataError as err:
            raise TrainError(str(err)) from None
        config = EfficientLLMConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.source_hidden,
            num_hidden_layers=cfg.source_layers,
            num_attention_heads=cfg.source_heads,
            num_key_value_heads=cfg.source_kv_heads,
            intermediate_size=cfg.source_ffn,
            head_dim=cfg.source_hidden // cfg.source_heads,
            max_position_embeddings=max(1024, cfg.seq_len),
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        init_dir.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)
    D.barrier(info)
    source_cfg = replace(
        cfg,
        source=str(init_dir),
        init_config=str(init_dir),
        target_params=None,
        tokens=cfg.source_tokens,
        out=str(src_out),
        resume=False,
        overwrite=True,
        halt_at_step=None,
        eval_every=10**9,
        save_every=10**9,
    )
    result = train(source_cfg)
    if result.get("exit_code"):
        raise SystemExit(result["exit_code"])
    if info.is_main:
        marker.write_text(json.dumps(settings))
    D.barrier(info)
    return src_out / "model"
