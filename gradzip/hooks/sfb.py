"""Capture the sufficient factors of ``nn.Linear`` layers during training (Xie et al. 2016,
https://arxiv.org/abs/1512.09295).

A forward hook sees the layer's input ``X``; it hangs a pre-hook on the autograd node of the
layer's matmul, which receives ``dY`` during backward just before the weight gradient
``dY^T X`` is formed (a node hook, not a tensor hook, so an in-place op on the output such as
``ReLU(inplace=True)`` does not hide it).
Each (X, dY) pair is kept, flattened to B x N and B x M, so a layer called several times per
forward (or accumulated over several backward passes) has all its calls: the weight gradient
is ``cat(dY)^T cat(X)``. A forward without backward leaves nothing behind (the output hook
never fires), and nothing is captured without grad mode or when the weight is frozen.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradzip.compress.base import CompressionError, Payload
from gradzip.compress.sfb import SFB, SFBCtx

__all__ = ["FactorCapture", "linear_weights"]

#: relative error between the factors' product and autograd's weight gradient above which the
#: first-step check fails (bf16 autocast rounding stays far below it; a missing factor not)
CHECK_TOLERANCE = 2e-2


def linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    """``{weight parameter name: layer}`` for every ``nn.Linear`` of ``model``."""
    out: dict[str, nn.Linear] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            out[f"{mod_name}.weight" if mod_name else "weight"] = mod
    return out


def _producer(output: torch.Tensor) -> torch.autograd.graph.Node | None:
    """The autograd node of the layer's matmul: past the reshapes of a >2-D input, because an
    in-place op on a view output re-bases the view and drops its own node from the graph."""
    node = output.grad_fn
    while node is not None and ("View" in node.name() or "Reshape" in node.name()):
        nxt = [n for n, _ in node.next_functions if n is not None]
        if len(nxt) != 1:
            break
        node = nxt[0]
    return node


class FactorCapture:
    """Hooks on one ``nn.Linear``; ``payload()`` gives the factors of all captured calls."""

    def __init__(self, name: str, layer: nn.Linear) -> None:
        self.name = name
        self.layer = layer
        self.inputs: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        #: rows (batch x leading dims, all calls) in forward since ``clear()``: the cost model's B
        self.rows = 0
        self._handle: RemovableHandle | None = layer.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, args: tuple[object, ...], output: object) -> None:
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            return
        if not self.layer.weight.requires_grad or not args:
            return
        x = args[0]
        if not isinstance(x, torch.Tensor):
            return
        x = x.detach().reshape(-1, self.layer.in_features)
        self.rows += x.shape[0]

        node = _producer(output)
        if node is None:
            return

        def on_grad(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
            dy = grad_outputs[0]
            if dy is not None:
                self.inputs.append(x)
                self.grads.append(dy.detach().reshape(-1, self.layer.out_features))

        node.register_prehook(on_grad)

    @property
    def calls(self) -> int:
        """Captured (forward, backward) pairs since the last ``clear()``."""
        return len(self.grads)

    def payload(self, sfb: SFB) -> tuple[Payload, SFBCtx]:
        """The factors of all captured calls as one payload (empty B = 0 when none)."""
        if not self.grads:
            return self.empty(sfb)
        x = torch.cat(self.inputs) if len(self.inputs) > 1 else self.inputs[0]
        dy = torch.cat(self.grads) if len(self.grads) > 1 else self.grads[0]
        return sfb.compress_factors(x, dy)

    def empty(self, sfb: SFB) -> tuple[Payload, SFBCtx]:
        """Factors with no rows: this rank contributes a zero gradient (B = 0)."""
        w = self.layer.weight
        x = torch.empty(0, self.layer.in_features, dtype=w.dtype, device=w.device)
        dy = torch.empty(0, self.layer.out_features, dtype=w.dtype, device=w.device)
        return sfb.compress_factors(x, dy)

    def check(self, sfb: SFB, payload: Payload, ctx: SFBCtx, grad: torch.Tensor) -> None:
        """Raise when the captured factors do not explain the weight gradient autograd made
        (the weight is shared with another module, or used outside ``forward``)."""
        rebuilt = sfb.decompress(payload, ctx).to(torch.float32)
        want = grad.to(torch.float32)
        err = float(torch.linalg.vector_norm(rebuilt - want))
        scale = float(torch.linalg.vector_norm(want))
        if err > CHECK_TOLERANCE * max(scale, 1e-30):
            raise CompressionError(
                f"sfb: the factors captured from layer {self.name!r} give a weight gradient "
                f"that differs from autograd's by {err:.3g} (norm of the gradient {scale:.3g}); "
                "the weight is probably used outside this layer's forward (tied weights, a "
                "functional call). Send it dense instead: compression={..., "
                f"{self.name!r}: 'none'}}"
            )

    def clear(self) -> None:
        self.rows = 0
        self.inputs.clear()
        self.grads.clear()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.clear()
