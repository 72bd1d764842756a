"""Train a variational MLP on several processes with DistributedDataParallel (DDP).

    torchrun --nproc_per_node=2 examples/ddp_train.py            # CPU, gloo
    torchrun --nproc_per_node=4 examples/ddp_train.py            # 4 GPUs, nccl (one per rank)
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 examples/ddp_train.py

Without torchrun it runs as a single process. See docs/distributed.md.

Each rank sees its shard of the data (DistributedSampler) and minimises the per-datum loss

    loss = -mean_{batch} E_q[log p(y | x)] + KL(q || p) / N,    N = size of the WHOLE data set,

and DDP averages the gradients over the ranks: the data term becomes the mean over the global
batch and the KL, identical on every rank, is counted exactly once. Nothing else changes.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import varlin
from varlin.synthetic import make_regression_1d


class Regressor(nn.Module):
    """The network and the likelihood in one module, so that DDP also averages the gradient of
    the learned noise scale (it is used in the loss, outside ``forward``, like the KL)."""

    def __init__(self, net: nn.Module, likelihood: varlin.likelihoods.Likelihood) -> None:
        super().__init__()
        self.net = net
        self.likelihood = likelihood

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Variational MLP trained with DDP")
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = _parse(argv)
    launched = "RANK" in os.environ  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = args.backend
    if backend == "auto":
        enough_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
        backend = "nccl" if enough_gpus else "gloo"
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # one core per rank
    if launched:
        dist.init_process_group(backend)
    world = dist.get_world_size() if launched else 1

    # The same data on every rank; the sampler gives each rank a disjoint shard.
    data = make_regression_1d(args.n_train, seed=args.seed)
    dataset = TensorDataset(data.x, data.y)
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=world, rank=rank, seed=args.seed
    )
    # drop_last: equal batches on every rank, so the average of the ranks' batch means is the
    # mean over the global batch.
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP broadcasts rank 0's)
    net = nn.Sequential(
        varlin.VariationalLinear(1, args.hidden, estimator="local"),
        nn.Tanh(),
        varlin.VariationalLinear(args.hidden, args.hidden, estimator="local"),
        nn.Tanh(),
        varlin.VariationalLinear(args.hidden, 1, estimator="local"),
    )
    likelihood = varlin.likelihoods.Gaussian(0.5, learn_noise=True)
    model = Regressor(net, likelihood).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # Independent noise on each rank: one gradient step then averages 'world' noise draws.
    torch.manual_seed(args.seed + 1 + rank)

    elbo = varlin.ELBO(likelihood, num_data=len(dataset))  # the GLOBAL size, not the shard's
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    if rank == 0:
        print(
            f"backend={backend} world_size={world} device={device} N={len(dataset)} "
            f"steps/epoch/rank={len(loader)} global batch={world * args.batch_size}",
            flush=True,
        )
    started = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        totals = torch.zeros(3, device=device)  # sum of loss, nll, batches
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            terms = elbo.terms(ddp(xb), yb, varlin.kl_divergence(net))
            opt.zero_grad(set_to_none=True)
            terms.loss.backward()  # DDP all-reduces (averages) the gradients here
            opt.step()
            totals += torch.stack([terms.loss.detach(), terms.nll.detach(), torch.ones_like(yb[0])])
        if launched:
            dist.all_reduce(totals)  # for logging only: the mean over all ranks' batches
        if rank == 0 and (epoch % 10 == 0 or epoch == args.epochs - 1):
            loss, nll = (totals[:2] / totals[2]).tolist()
            kl = float(varlin.kl_divergence(net).detach())
            noise = float(likelihood.noise_scale.detach())
            print(
                f"epoch {epoch:3d}  loss {loss:8.4f}  nll {nll:8.4f}  KL/N {kl / len(dataset):.4f}"
                f"  noise {noise:.3f}",
                flush=True,
            )

    # Every rank holds the same parameters: check it, then evaluate once on rank 0.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if launched:
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        identical = torch.equal(flat, reference)
        agree = torch.tensor([float(identical)], device=device)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN)
        identical = bool(agree.item())
    else:
        identical = True
    metrics: dict[str, float] = {}
    if rank == 0:
        test = make_regression_1d(500, gap=False, seed=args.seed + 1)
        pred = varlin.predict(net, test.x.to(device), likelihood=likelihood, num_samples=64)
        rmse = ((pred.mean - test.y.to(device)) ** 2).mean().sqrt()
        metrics = {
            "test_nll": float(pred.nll(test.y.to(device))),
            "test_rmse": float(rmse),
            "seconds": time.perf_counter() - started,
        }
        print(
            f"test NLL {metrics['test_nll']:.4f}  RMSE {metrics['test_rmse']:.4f}  "
            f"({metrics['seconds']:.1f} s); parameters identical on all ranks: {identical}",
            flush=True,
        )
    if launched:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
