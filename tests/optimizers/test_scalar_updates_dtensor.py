"""The scalar updates (Lion, AdamW) on DTensors, as FSDP2 and tensor parallelism hand them over, equal the updates on
plain tensors bit for bit. Lion takes a per-tensor path for DTensors because torch 2.11's DTensor has no sharding
strategy for the out-of-place _foreach_lerp nor for _foreach_sign_ (scripts/test_torch_versions.py found it: every
FSDP2 run with Lion as the scalar algorithm failed there); this test checks that path's arithmetic on any torch."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from optimizers.common.scalar_updates import adamw_update, lion_update

UPDATES = {
    "lion": (lion_update, 1, dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)),
    "adamw": (adamw_update, 2, dict(lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1, epsilon=1e-8)),
}


@pytest.fixture(scope="module")
def mesh():
    """A one-rank gloo mesh in this process (a HashStore: no port), torn down so later tests see no process group."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("placement", [Shard(0), Replicate()], ids=["shard", "replicate"])
@pytest.mark.parametrize("name", list(UPDATES))
def test_update_on_dtensors_equals_update_on_plain_tensors(name, placement, mesh):
    update, state_count, hyper = UPDATES[name]
    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 6), (5,), (3, 4, 2)]
    params = [torch.randn(shape, generator=generator) for shape in shapes]
    states = [[torch.randn(shape, generator=generator).abs() for shape in shapes] for _ in range(state_count)]
    plain = [[t.clone() for t in params], *[[t.clone() for t in state] for state in states]]
    distributed = [[distribute_tensor(t.clone(), mesh, [placement]) for t in tensors] for tensors in [params, *states]]
    for step in (1, 2, 3):
        grads = [torch.randn(shape, generator=generator) for shape in shapes]
        step_kwargs = dict(step=step) if name == "adamw" else {}
        update(plain[0], grads, *plain[1:], **hyper, **step_kwargs)
        update(distributed[0], [distribute_tensor(g, mesh, [placement]) for g in grads], *distributed[1:], **hyper,
               **step_kwargs)
    for expected, got in zip(plain, distributed):
        for e, g in zip(expected, got):
            assert isinstance(g, DTensor) and g.placements == (placement,)
            torch.testing.assert_close(g.full_tensor(), e, rtol=0, atol=0)
    assert not torch.equal(plain[0][0], params[0])  # the parameters moved
