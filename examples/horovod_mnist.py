"""Fashion-MNIST with Horovod on CPU (gloo), one process per rank.

    horovodrun --gloo -np 2 -H localhost:2 python examples/horovod_mnist.py

A plain Horovod script; gradzip enters through the single line marked "gradzip" below: the
optimizer wrapper sends 1-bit compressed gradients (with error feedback) instead of fp32.
"""

import argparse
import gzip
import math
import os
import time

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from torch import nn
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


def metric_average(value, name):
    return hvd.allreduce(torch.tensor(value), name=name).item()


def evaluate(model, loader):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    model.train()
    return metric_average(correct / total, "accuracy")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--compression", default="onebit")
    parser.add_argument(
        "--dense-steps", type=int, default=None, help="first steps sent dense (default: gradzip's)"
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // hvd.size()))

    train = fashion_mnist("train", args.data_dir)
    test = fashion_mnist("test", args.data_dir)
    sampler = DistributedSampler(train, num_replicas=hvd.size(), rank=hvd.rank(), seed=args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    test_sampler = DistributedSampler(test, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=False)
    test_loader = DataLoader(test, batch_size=1000, sampler=test_sampler)

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=args.momentum)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    # gradzip: the one changed line; it was
    # optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    optimizer = gradzip.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), compression=args.compression, dense_steps=args.dense_steps)  # noqa: E501

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
            if hvd.rank() == 0 and (step % args.log_every == 0 or step == 1):
                print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
            if args.steps is not None and step >= args.steps:
                break
        if args.steps is not None and step >= args.steps:
            break

    accuracy = evaluate(model, test_loader)
    if hvd.rank() == 0:
        print(f"final loss {loss.item():.4f}")
        print(f"test accuracy {accuracy:.4f} after {step} steps in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
