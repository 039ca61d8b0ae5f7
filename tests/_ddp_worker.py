"""Worker of the DistributedDataParallel test (spawned; two CPU processes on gloo)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

import constraint_layers as cl


def build(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv1d(2, 8, 5, padding=2), torch.nn.GELU(), torch.nn.Conv1d(8, 1, 5, padding=2)
    )
    return cl.wrap(net, cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high"))


def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 2, 40, generator=gen), torch.randn(8, 1, 40, generator=gen)


def worker(rank: int, world: int, store: str, out: str) -> None:
    # a file store: no TCP port to race for with other processes on the machine
    # a bounded timeout: a stuck rendezvous or collective fails the test instead of hanging CI
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    model = torch.nn.parallel.DistributedDataParallel(build())
    x, y = data()
    shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss = (model(x[shard]) - y[shard]).pow(2).mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        after = model(x)
    if rank == 0:
        torch.save({"grads": grads, "after": after}, out)
    dist.destroy_process_group()
