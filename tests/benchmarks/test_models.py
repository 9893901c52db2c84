"""The benchmark models: output shapes, and which layers SFB can use."""

from __future__ import annotations

import pytest
import torch

from benchmarks.models import MLP, SmallCNN, linear_layers


@pytest.mark.parametrize("in_shape", [(1, 28, 28), (1, 8, 8), (3, 13, 17)])
def test_cnn_output_shape_and_gradients(in_shape: tuple[int, int, int]) -> None:
    model = SmallCNN(in_shape, num_classes=7)
    out = model(torch.randn(5, *in_shape))
    assert out.shape == (5, 7)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    assert sorted(linear_layers(model)) == ["classifier.1", "classifier.3"]


def test_mlp_layers_and_bad_sizes() -> None:
    model = MLP(784, (256, 128), 10)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    shapes = [tuple(m.weight.shape) for m in linear_layers(model).values()]
    assert shapes == [(256, 784), (128, 256), (10, 128)]
    with pytest.raises(ValueError, match="widths"):
        MLP(784, (0,), 10)
    with pytest.raises(ValueError, match="too small"):
        SmallCNN((1, 3, 3))
