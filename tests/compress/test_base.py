import pickle

import pytest
import torch

import gradzip
from gradzip.compress import CompressionError, Payload, derive_seed


def test_registry_lists_builtins() -> None:
    names = gradzip.available()
    for name in ("none", "fp16", "bf16"):
        assert name in names


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"valid names: .*fp16"):
        gradzip.compressor("nosuch")


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown option 'levels' for compressor 'fp16'"):
        gradzip.compressor("fp16:levels=3")


def test_spec_without_equals_is_rejected() -> None:
    with pytest.raises(ValueError, match="key=value"):
        gradzip.compressor("fp16:oops")


def test_compressor_object_passes_through() -> None:
    c = gradzip.compressor("bf16")
    assert gradzip.compressor(c) is c
    assert pickle.loads(pickle.dumps(c)) == c


def test_payload_bytes_round_trip() -> None:
    parts = (torch.arange(5, dtype=torch.int32), torch.randn(3), torch.zeros(0, dtype=torch.uint8))
    payload = Payload(parts)
    assert payload.nbytes == 5 * 4 + 3 * 4
    buf = payload.to_bytes()
    assert buf.numel() == payload.nbytes
    back = Payload.from_bytes(buf, payload.layout())
    for a, b in zip(back, parts, strict=True):
        assert torch.equal(a, b)


def test_payload_bytes_round_trip_misaligned() -> None:
    # 3 bytes of bits, then fp32 scales: the scales start at an odd byte offset
    parts = (torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([0.5, -2.0]))
    back = Payload.from_bytes(Payload(parts).to_bytes(), Payload(parts).layout())
    assert torch.equal(back[0], parts[0]) and torch.equal(back[1], parts[1])


def test_payload_rejects_non_flat() -> None:
    with pytest.raises(CompressionError, match="flat and contiguous"):
        Payload((torch.zeros(2, 2),))


def test_derive_seed_is_stable_and_distinct() -> None:
    a = derive_seed(0, 1, "layer.weight", 0)
    assert a == derive_seed(0, 1, "layer.weight", 0)
    assert len({a, derive_seed(0, 2, "layer.weight", 0), derive_seed(0, 1, "x", 0),
                derive_seed(0, 1, "layer.weight", 1), derive_seed(1, 1, "layer.weight", 0)}) == 5
    assert 0 <= a < 2**63


@pytest.mark.parametrize("name", ["none", "fp16", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(), (1,), (0,), (7, 3)])
def test_baselines_round_trip(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    c = gradzip.compressor(name)
    x = torch.randn(shape).to(dtype)
    payload, ctx = c.compress(x)
    y = c.decompress(payload, ctx)
    assert y.shape == x.shape and y.dtype == x.dtype
    tol = {"none": 0, "fp16": 1e-3, "bf16": 1e-2}[name]
    torch.testing.assert_close(y.float(), x.float(), rtol=tol, atol=tol)
    itemsize = {"none": x.element_size(), "fp16": 2, "bf16": 2}[name]
    assert payload.nbytes == x.numel() * itemsize


def test_integer_tensor_rejected_with_dtype_named() -> None:
    with pytest.raises(CompressionError, match=r"torch\.int64"):
        gradzip.compressor("fp16").compress(torch.arange(4))
