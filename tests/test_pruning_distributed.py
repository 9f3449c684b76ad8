"""Under torch.distributed (gloo, 2 processes) every rank makes the same decisions, and the run equals one
process on the concatenated batch: averaged gradients, tokens counted over ranks, OBS Hessians all-reduced."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model

from effllm.model.params import count_parameters
from effllm.pruning import Pruner, PruningConfig

GQA = dict(num_attention_heads=[4, 6, 8, 3], num_key_value_heads=[4, 2, 2, 1], intermediate_size=[40, 24, 0, 33])
WORLD, LOCAL = 2, 2


def _run(rank: int, world: int):
    """Three training steps and one prune step; rank -1 means a single process on the full batch."""
    torch.set_num_threads(1)
    model = tiny_model(**GQA, tie_word_embeddings=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = Pruner(model, PruningConfig(weight_update="obs"), optimizer=opt)
    source = count_parameters(model.config).total
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        full = torch.randint(1, 512, (WORLD * LOCAL, 13), generator=gen)
        batch = full if rank < 0 else full[rank * LOCAL : (rank + 1) * LOCAL]
        model(batch, labels=batch).loss.backward()
        if rank >= 0:  # what DDP does: average the gradients
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        pruner.update_saliency()
        opt.step()
        opt.zero_grad(set_to_none=True)
    records = pruner.prune_to(int(source * 0.7), step=3, tokens=3 * full.numel(), batch=batch)
    return records, {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, init_file: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        records, state = _run(rank, world)
        torch.save({"records": records, "state": state}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_and_match_one_process(tmp_path):
    out = str(tmp_path / "result")
    mp.start_processes(
        _worker, args=(WORLD, str(tmp_path / "init"), out), nprocs=WORLD, join=True, start_method="spawn"
    )
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]
    single_records, single_state = _run(-1, 1)
    key = lambda recs: [(r["type"], r["layer"], r["index"], r["size"], r["params_after"]) for r in recs]
    assert key(ranks[0]["records"]) == key(ranks[1]["records"]) == key(single_records)
    assert len(single_records) > 5
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name  # bitwise identical across ranks
        assert torch.allclose(value, single_state[name], atol=1e-5), name
