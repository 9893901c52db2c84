"""benchmarks/dgc_floor.py: DGC's ratio from payload sizes, per min_values floor."""

from torch import nn

from benchmarks.dgc_floor import ratio


def test_the_floor_only_costs_on_small_tensors() -> None:
    big = nn.Linear(1000, 1000, bias=False)  # 0.1% of 1M is 1000 values: above any floor here
    for floor in (0, 32, 256):
        assert ratio(big, f"dgc:ratio=0.001,min_values={floor}") == 4e6 / (1000 * 8)
    small = nn.Linear(100, 50, bias=False)  # 5000 weights: 5 values at 0.1%
    assert ratio(small, "dgc:ratio=0.001,min_values=0") == 20000 / (5 * 8)
    assert ratio(small, "dgc:ratio=0.001,min_values=256") == 20000 / (256 * 8)
    tiny = nn.Linear(10, 10)  # every tensor under 1024 elements: sent dense
    assert ratio(tiny, "dgc:ratio=0.001") == 1.0
