"""DDP and FSDP2 (fully_shard per block) on CPU with gloo, 2 processes: gradients after one step
equal the single-process gradients of the same global batch.

Each rank packs its own half of the global batch and its loss is that half's mean, so the
data-parallel gradient (averaged over ranks) is the gradient of the mean of the two halves' losses:
that is the single-process reference computed here.
"""
import dataclasses
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


def _mixed_precision_worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    tf.set_backend("auto")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = fresh_model()
        mesh = init_device_mesh("cpu", (WORLD,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        out = model(rank_batch(rank))
        out["loss"].backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        params = {n: (p.dtype, p.grad.dtype) for n, p in model.named_parameters()}
        torch.save({"grads": grads, "dtypes": params, "loss": out["loss"].detach()},
                   os.path.join(out_dir, f"mp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _as_forward_input(batch):
    """The batch as FSDP2's policy hands it to the root module (cast_forward_inputs=True): its
    floating-point tensors (noised spans, targets, span sizes) in bf16."""
    cast = lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t  # noqa: E731
    spans = {k: dataclasses.replace(s, **{f.name: cast(getattr(s, f.name)) for f in dataclasses.fields(s)})
             for k, s in batch.spans.items()}
    return dataclasses.replace(batch, spans=spans, span_sizes=cast(batch.span_sizes))


def test_fsdp2_bf16_mixed_precision_equals_single_process(tmp_path):
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on 2 gloo ranks: the
    fp32 sharded gradients are the mean over ranks of the bf16 model's gradients computed in one
    process, and lie within bf16 tolerance of the all-fp32 gradients."""
    mp.spawn(_mixed_precision_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)        # the ranks' thread count: the same bf16 accumulation order
    try:
        with tf.use_backend("auto"):
            per_rank = []
            for dtype in (torch.bfloat16, torch.float32):
                model = fresh_model().to(dtype)
                grads = []
                for r in range(WORLD):
                    model.zero_grad(set_to_none=True)
                    batch = rank_batch(r) if dtype == torch.float32 else _as_forward_input(rank_batch(r))
                    model(batch)["loss"].backward()
                    grads.append({n: p.grad.float() for n, p in model.named_parameters()})
                per_rank.append(grads)
    finally:
        torch.set_num_threads(previous)
    mean = lambda grads: {n: sum(g[n] for g in grads) / WORLD for n in grads[0]}  # noqa: E731
    bf16_mean, fp32_mean = mean(per_rank[0]), mean(per_rank[1])

    for rank in range(WORLD):
        results = torch.load(tmp_path / f"mp{rank}.pt")
        assert all(d == (torch.float32, torch.float32) for d in results["dtypes"].values()), results["dtypes"]
        assert set(results["grads"]) == set(fp32_mean)
        for name, g in results["grads"].items():
            assert torch.isfinite(g).all(), name
            # The same bf16 computation: nearly every element is bit-equal; a few differ by a bf16
            # rounding of a sum accumulated in another order (the embedding rows of BOS/BOI).
            same = (g == bf16_mean[name]).float().mean()
            assert same > 0.95, (rank, name, float(same))
            for want, bound in ((bf16_mean[name], 1e-2), (fp32_mean[name], 5e-2)):
                error = (g - want).norm() / want.norm().clamp_min(1e-6)
                assert error < bound, (rank, name, float(error), bound)
