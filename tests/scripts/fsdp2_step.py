"""One FAM SGD step on a tiny causal LM sharded with FSDP2 (``fully_shard``, gloo on CPU), saved to a file.

The accelerate/Trainer FSDP path needs GPUs, so this drives the same pieces by hand: the probe computes the
penalty inside the head's forward, and the gradient must reach the sharded parameters. The LM head is sharded
on its own with ``reshard_after_forward=True``: the hardest case, where its weight is whole only inside forward.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import batch_for, build

from fam_hf import FlatnessProbe

LR, FAM_LAMBDA = 0.5, 2.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    results = {gradient: sharded_step(gradient) for gradient in ("full", "head", "weights")}
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.destroy_process_group()


def sharded_step(gradient: str) -> dict[str, torch.Tensor]:
    """Return the whole parameters after one SGD step of FSDP2 training with FAM in ``gradient`` mode."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = build("llama", "causal_lm")
    batch = batch_for(model, size=8)
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)
    probe = FlatnessProbe(model)
    local = {k: v.chunk(world)[rank] for k, v in batch.items()}
    model.train()
    with probe.watch(local, local["labels"], gradient=gradient) as seen:
        loss = model(**local, num_items_in_batch=num_items).loss
    penalty = seen[0].flatness.total / num_items
    # each rank's share of a sum over the global batch; FSDP averages gradients across ranks
    ((loss + FAM_LAMBDA * penalty) * world).backward()
    with torch.no_grad():
        for param in model.parameters():
            param -= LR * param.grad
    return {n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for n, p in model.named_parameters()}


if __name__ == "__main__":
    main()
