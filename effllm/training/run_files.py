"""What a run keeps in its --out directory, and the data step that first writes there.

run.json (the marker: the config, its fingerprint and the plan) tells an effllm run from anything
else, so that two runs are never mixed in one directory; metrics.jsonl, evals.jsonl and
prune_log.jsonl are append-only logs, cut back to the checkpoint's step on resume; ``prepare_data``
writes run.json, tokenizes into <out>/data and, for --overwrite, clears the previous run's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from effllm.common.fileio import write_atomic, write_json_atomic
from effllm.training import distributed as D
from effllm.training.plan import Plan, TrainError
from effllm.training.recipe import TrainConfig

RUN_MARKER = "run.json"
# Settings that do not change what a run computes (bookkeeping, and how the data is tokenized):
# --resume may change them, and they are not part of the run's fingerprint.
VOLATILE = ("resume", "overwrite", "quiet", "halt_at_step", "check_decisions", "save_every", "log_every", "num_proc",
            "shard_chars")  # fmt: skip
# A previous run's outputs, removed by --overwrite once every input has been checked.
RUN_OUTPUTS = ("checkpoint", "model", "metrics.jsonl", "prune_log.jsonl", "evals.jsonl", "results.json")


def run_fingerprint(cfg: TrainConfig) -> str:
    """What makes two invocations 'the same run' (so --resume and re-runs can be told from a new run)."""
    keys = asdict(cfg)
    for volatile in VOLATILE:
        keys.pop(volatile, None)
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_out_dir(out: Path, cfg: TrainConfig) -> None:
    """Refuse to mix two runs in one directory unless the user says --resume or --overwrite."""
    if cfg.resume:  # a run killed before its first checkpoint has run.json only: it starts again at step 0
        if not (out / RUN_MARKER).is_file():
            raise TrainError(f"--resume: {out} holds no effllm run (no {RUN_MARKER}); check --out")
        return
    # The quickstart's cached source lives in <out>/source, and --tokenize-only writes <out>/data
    # before any run: neither is a run of its own.
    if not out.exists() or not [p for p in out.iterdir() if p.name not in ("source", "data")] or cfg.overwrite:
        return
    marker = out / RUN_MARKER
    what = "another effllm run" if marker.is_file() else "files that are not an effllm run"
    raise TrainError(
        f"{out} already holds {what}; pass --resume to continue it, --overwrite to replace it, or another --out"
    )


class JsonlLog:
    """Append-only JSONL, truncated on resume to records at or before the checkpoint's step."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, records: list[dict]) -> None:
        if self.enabled and records:
            with self.path.open("a") as f:
                f.writelines(json.dumps(r, default=float) + "\n" for r in records)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def prepare_data(cfg: TrainConfig, out: Path, info: D.DistInfo, tokenizer, plan: Plan):
    """Tokenized train/held-out files in <out>/data (effllm.data.prepare.TokenData), and run.json.

    Rank 0 tokenizes; the others wait and read the same files. run.json is written first, so that
    a run killed while it tokenizes continues with --resume; bad data removes it again."""
    from effllm.data.prepare import DataError, prepare_tokens

    data_dir = out / "data"
    marker = out / RUN_MARKER
    run_record = {"fingerprint": run_fingerprint(cfg), "config": asdict(cfg), "plan": asdict(plan)}
    created = [p for p in (out, *out.parents) if not p.exists()]
    early_marker = info.is_main and not marker.exists()
    if early_marker:
        write_json_atomic(marker, run_record)
    data_args = dict(heldout_fraction=cfg.heldout_fraction, max_tokens=cfg.max_data_tokens, text_field=cfg.text_field,
                     split=cfg.data_split, num_proc=cfg.num_proc, shard_chars=cfg.shard_chars)  # fmt: skip
    try:
        # the other ranks wait for the files, not in a collective: tokenizing can take hours, far
        # longer than a barrier's timeout (if rank 0 fails, torchrun stops them)
        main = info.is_main
        data_info = prepare_tokens(cfg.data, tokenizer, data_dir, show_progress=main and not cfg.quiet,
                                   wait=not main, **data_args)  # fmt: skip
        D.barrier(info)
    except DataError:
        if early_marker:  # bad input leaves the directory as it was
            marker.unlink(missing_ok=True)
            for path in created:
                with contextlib.suppress(OSError):
                    path.rmdir()
        raise
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and not cfg.resume:  # only now that every input has been checked
            for stale in RUN_OUTPUTS:
                p = out / stale
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        write_json_atomic(marker, run_record)
    return data_info
