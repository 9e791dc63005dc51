"""DDP and FSDP2 (fully_shard per block) on CPU with gloo, 2 processes: gradients after one step
equal the single-process gradients of the same global batch.

Each rank packs its own half of the global batch and its loss is that half's mean, so the
data-parallel gradient (averaged over ranks) is the gradient of the mean of the two halves' losses:
that is the single-process reference computed here.
"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import transfusion_fast as tf
from transfusion_fast import ModalityConfig, Model, ModelConfig, pack

WORLD = 2
CONFIG = ModelConfig(dim=32, depth=2, n_heads=2, n_kv_heads=1,
                     modalities=(ModalityConfig("image", "image", channels=1, patch_size=2, max_size=8),))


def rank_batch(rank: int):
    """Rank 0 gets text and images; rank 1 text only (its image head must still sync)."""
    g = torch.Generator().manual_seed(10 + rank)
    if rank == 1:
        return pack([[torch.randint(0, 250, (7,), generator=g)], [torch.randint(0, 250, (4,), generator=g)]],
                    CONFIG, seed=rank)
    samples = [[torch.randint(0, 250, (3,), generator=g), torch.randn(1, 4, 4, generator=g)],
               [torch.randn(1, 2, 2, generator=g), torch.randint(0, 250, (5,), generator=g)]]
    return pack(samples, CONFIG, seed=rank)


def fresh_model():
    torch.manual_seed(0)
    return Model(CONFIG)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    tf.set_backend("reference")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        batch = rank_batch(rank)
        results = {}

        model = fresh_model()
        ddp = DistributedDataParallel(model)
        ddp(batch)["loss"].backward()
        results["ddp"] = {n: p.grad.clone() for n, p in model.named_parameters()}

        model = fresh_model()
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model(batch)["loss"].backward()
        results["fsdp"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        results["fsdp_sharded"] = type(next(model.parameters())).__name__
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_gradients_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)

    with tf.use_backend("reference"):
        model = fresh_model()
        loss = sum(model(rank_batch(r))["loss"] for r in range(WORLD)) / WORLD
        loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters()}

    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results["fsdp_sharded"] == "DTensor"
        for mode in ("ddp", "fsdp"):
            grads = results[mode]
            assert set(grads) == set(expected)
            for name, g in expected.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=f"{mode} rank {rank} {name}")
