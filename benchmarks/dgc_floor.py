"""DGC's payload ratio on each benchmark model for several ``min_values`` floors (no training).

``python -m benchmarks.dgc_floor``: dense bytes / bytes of DGC 0.1%'s payloads, as
:func:`gradzip.plan.layout.buckets` lays them out (the optimizer's own policy: tensors under
its ``min_compress_numel`` sent dense; results/dgc_min_values.md).
"""

from __future__ import annotations

import argparse

from torch import nn

from benchmarks.accuracy_tasks import CharLSTM
from benchmarks.models import MLP, SmallCNN
from gradzip.plan.layout import buckets, from_module


def ratio(model: nn.Module, spec: str) -> float:
    """Dense bytes over payload bytes of ``model``'s parameters under ``spec``, laid out in
    buckets as the optimizer lays them out (its policy keeps small tensors dense)."""
    tensors = from_module(model)
    sent = sum(bucket.payload for _, bucket in buckets(tensors, spec))
    return sum(t.nbytes for t in tensors) / sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--floors", type=int, nargs="+", default=[32, 64, 128, 256])
    args = ap.parse_args()
    models = {
        "CNN (Fashion-MNIST)": SmallCNN((1, 28, 28), 10),
        "MLP 670k": MLP(784, hidden=(512, 512), num_classes=10),
        "MLP 1.9M": MLP(784, hidden=(1024, 1024), num_classes=10),
        "MLP 5.8M (network benchmark)": MLP(784, hidden=(2048, 2048), num_classes=10),
        "LSTM": CharLSTM(65),
    }
    print("| model | " + " | ".join(f"{f} values" for f in args.floors) + " |")
    print("|---|" + "---|" * len(args.floors))
    for name, model in models.items():
        cells = [f"{ratio(model, f'dgc:ratio=0.001,min_values={f}'):.0f}x" for f in args.floors]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
