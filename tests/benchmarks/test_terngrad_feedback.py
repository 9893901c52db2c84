"""The measurement behind TernGrad having no error feedback (benchmarks/terngrad_feedback.py)."""

import gradzip
from benchmarks.terngrad_feedback import _WithFeedback, residual_growth, snr


def test_terngrad_residual_grows_and_two_phase_feedback_loses_snr() -> None:
    growth = residual_growth(_WithFeedback(), steps=(1, 100))
    assert growth[0] < 1.5 and growth[1] > 10  # not bounded by the gradient: no contraction
    onebit = residual_growth(gradzip.compressor("onebit"), steps=(1, 100))
    assert onebit[1] < 3  # 1-bit's residual stays at the gradient's scale
    _, fed = snr(_WithFeedback())
    _, plain = snr(gradzip.compressor("terngrad"))
    assert fed < plain - 3
