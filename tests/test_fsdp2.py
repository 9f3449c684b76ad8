"""FSDP2 (fully_shard) on the CPU with gloo, 2 ranks: what effllm's future FSDP2 path builds on (docs/scale.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_fully_shard_trains_and_gathers_full_state_on_cpu_gloo():
    probe = Path(__file__).with_name("fsdp2_probe.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541", str(probe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert result["world"] == 2 and result["same_on_every_rank"]
    assert result["sharded_rows"] * 2 == result["full_rows"] == 128  # each rank holds half, dim 0
    assert result["optimizer_state_full"]
    # FSDP2 over 2 ranks x 2 sequences == one process on the 4 sequences (gradients averaged alike)
    assert result["max_abs_error"] < 1e-5, result
