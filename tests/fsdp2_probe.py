"""Run under torchrun (gloo, CPU): FSDP2 (fully_shard) trains an EfficientLLM model and gathers its full
state; rank 0 checks it against the same steps in one process on the whole batch. Used by
tests/test_fsdp2.py; the starting point of an FSDP2 path for sources that do not fit DDP."""

import hashlib
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

from effllm import EfficientLLMConfig, EfficientLLMForCausalLM


def build():
    torch.manual_seed(0)
    config = EfficientLLMConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64,
                                tie_word_embeddings=False)  # fmt: skip
    return EfficientLLMForCausalLM(config)


def step(model, opt, batch):
    logits = model(batch[:, :-1], use_cache=False).logits
    F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [torch.randint(0, 128, (2 * world, 17), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    model = build()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in batches:
        step(model, opt, batch[2 * rank : 2 * rank + 2])
    local = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    optim = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    digest = hashlib.sha256(b"".join(v.detach().contiguous().view(torch.uint8).numpy().tobytes()
                                     for _, v in sorted(full.items()))).hexdigest()  # fmt: skip
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if rank == 0:
        reference = build()
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        for batch in batches:
            step(reference, ref_opt, batch)
        ref = reference.state_dict()
        error = max((full[k] - ref[k]).abs().max().item() for k in ref)
        moments = sorted(optim["state"])
        print(json.dumps({
            "world": world, "same_on_every_rank": len(set(digests)) == 1, "max_abs_error": error,
            "sharded_rows": local["model.embed_tokens.weight"], "full_rows": full["model.embed_tokens.weight"].shape[0],
            "optimizer_state_full": all(optim["state"][k]["exp_avg"].shape == full[k].shape for k in moments),
        }))  # fmt: skip
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
