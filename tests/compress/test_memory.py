import pytest
import torch

from gradzip.compress import CompressionError, ResidualMemory


def test_compensated_equals_decompressed_plus_residual() -> None:
    mem = ResidualMemory()
    for step in range(3):
        grad = torch.randn(10, 4, generator=torch.Generator().manual_seed(step))
        g = mem.compensate("w", grad)
        expected = g.clone()
        decompressed = torch.sign(g) * g.abs().mean()
        mem.update("w", g, decompressed)
        # the residual is exactly the fp32 difference; adding it back is exact up to the one
        # rounding of that addition (a float sum cannot promise more)
        assert torch.equal(mem.residuals["w"], expected - decompressed)
        torch.testing.assert_close(decompressed + mem.residuals["w"], expected, rtol=0, atol=1e-6)


def test_nan_names_key_and_keeps_residual() -> None:
    mem = ResidualMemory()
    g = mem.compensate("fc.weight", torch.ones(3))
    mem.update("fc.weight", g, torch.zeros(3))
    before = mem.residuals["fc.weight"].clone()
    with pytest.raises(CompressionError, match=r"'fc.weight' has 1 NaN and 1 Inf"):
        mem.compensate("fc.weight", torch.tensor([1.0, float("nan"), float("inf")]))
    assert torch.equal(mem.residuals["fc.weight"], before)


def test_state_dict_round_trip() -> None:
    mem = ResidualMemory()
    g = mem.compensate(0, torch.randn(5))
    mem.update(0, g, torch.zeros(5))
    other = ResidualMemory()
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.residuals[0], mem.residuals[0])
    assert other.residuals[0].data_ptr() != mem.residuals[0].data_ptr()


def test_shape_change_for_a_key_is_an_error() -> None:
    mem = ResidualMemory()
    mem.update("k", mem.compensate("k", torch.ones(3)), torch.zeros(3))
    with pytest.raises(CompressionError, match="shape"):
        mem.compensate("k", torch.ones(4))
