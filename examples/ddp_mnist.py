"""Fashion-MNIST with PyTorch DistributedDataParallel on CPU (gloo), one process per rank.

    torchrun --nproc-per-node 2 examples/ddp_mnist.py

A plain DDP script; gradzip enters through the single line marked "gradzip" below, which
registers a communication hook that compresses every gradient bucket (top-k, 1% of the
entries, with error feedback) before it crosses the network.
"""

import argparse
import gzip
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import gradzip

DATA_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist


def read_idx(path):
    """An IDX file (gzip) as a uint8 tensor: magic, one big-endian int32 per dim, then data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).view(dims)


def fashion_mnist(split, data_dir):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    x = (images.float().div(255).unsqueeze(1) - 0.2860) / 0.3530
    return TensorDataset(x, labels.long())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def evaluate(model, loader):
    model.eval()
    correct = torch.zeros(2)
    with torch.no_grad():
        for x, y in loader:
            correct += torch.tensor([(model(x).argmax(1) == y).sum().item(), len(y)])
    dist.all_reduce(correct)
    model.train()
    return (correct[0] / correct[1]).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--compression", default="topk:ratio=0.01")
    parser.add_argument(
        "--dense-steps", type=int, default=None, help="first steps sent dense (default: gradzip's)"
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # rank, world size and address come from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    train = fashion_mnist("train", args.data_dir)
    test = fashion_mnist("test", args.data_dir)
    sampler = DistributedSampler(train, seed=args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    test_loader = DataLoader(test, batch_size=1000, sampler=DistributedSampler(test, shuffle=False))

    model = DDP(Net())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * world, momentum=args.momentum)
    # gradzip: the added line (optimizer= lets DGC check that momentum is not applied twice)
    model.register_comm_hook(*gradzip.ddp_comm_hook(args.compression, optimizer=optimizer, dense_steps=args.dense_steps))  # noqa: E501

    step, start = 0, time.time()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"loss became {loss.item()} at step {step}")
            if rank == 0 and (step % args.log_every == 0 or step == 1):
                print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
            if args.steps is not None and step >= args.steps:
                break
        if args.steps is not None and step >= args.steps:
            break

    accuracy = evaluate(model, test_loader)
    if rank == 0:
        print(f"final loss {loss.item():.4f}")
        print(f"test accuracy {accuracy:.4f} after {step} steps in {time.time() - start:.1f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
