"""Forward pre-hooks that read every head's activation at one position per prompt.

The per-head activation is the input of the attention output projection (TransformerLens'
``hook_z``): ``[batch, pos, heads * head_dim]`` before the heads are mixed by ``o_proj``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sahs.extract.adapters import ModelAdapter


@contextmanager
def forward_pre_hooks(hooks: Mapping[nn.Module, Callable[[nn.Module, tuple[Any, ...]], Any]]) -> Iterator[None]:
    """Register one forward pre-hook per module for the ``with`` block; all are removed in ``finally``."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for module, hook in hooks.items():
            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised by the last needed hook so that later layers do no work (early exit)."""


def last_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token: the first generated token is predicted there.

    Computed from the mask rather than assumed to be ``-1``, so that left and right padding both work.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)  # [batch]


class HeadCapture:
    """Context manager: hooks on the chosen layers' ``o_proj`` inputs, removed on exit.

    ``run(forward, positions)`` calls ``forward()`` and returns ``[batch, layers, heads, head_dim]``
    for the layers in ``self.layers`` (all by default). With ``early_exit`` the forward stops right
    after the last chosen layer's heads are read. Inside a longer computation (generation), ``arm``
    before the forward to read and ``collect`` after it; unarmed hooks let every other forward pass,
    and ``remove`` takes them out early.
    """

    def __init__(self, adapter: ModelAdapter, layers: Sequence[int] | None = None, early_exit: bool = False):
        num_layers = adapter.layout.num_layers
        self.layers = sorted(set(range(num_layers) if layers is None else layers))
        if not self.layers or self.layers[0] < 0 or self.layers[-1] >= num_layers:
            raise ValueError(f"layers must be in [0, {num_layers}), got {list(layers or [])}")
        self.adapter = adapter
        self.early_exit = early_exit
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._positions: torch.Tensor | None = None
        self._captured: dict[int, torch.Tensor] = {}

    def _hook(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        layout = self.adapter.layout
        stop_here = self.early_exit and layer == self.layers[-1]

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._positions is None:  # not armed: a forward this capture does not read
                return
            z = args[0]  # [batch, pos, heads * head_dim]
            rows = torch.arange(z.shape[0], device=z.device)
            picked = z[rows, self._positions.to(z.device)]  # [batch, heads * head_dim]
            self._captured[layer] = picked.reshape(z.shape[0], layout.num_heads, layout.head_dim)
            if stop_here:
                raise _StopForward

        return hook

    def __enter__(self) -> HeadCapture:
        try:
            for layer in self.layers:
                module = self.adapter.out_projs[layer]
                self._handles.append(module.register_forward_pre_hook(self._hook(layer)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks now (``__exit__`` does it too); later forwards run as if none were there."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, forward: Callable[[], Any], positions: torch.Tensor) -> torch.Tensor:
        self.arm(positions)
        try:
            forward()
        except _StopForward:
            pass
        return self.collect()

    def arm(self, positions: torch.Tensor) -> None:
        """Read the next forward pass at ``positions`` (one per row)."""
        if not self._handles:
            raise RuntimeError("HeadCapture must be used inside its `with` block")
        self._positions, self._captured = positions, {}

    def collect(self) -> torch.Tensor:
        """``[batch, layers, heads, head_dim]`` read since ``arm``; disarms, so later forwards pass untouched."""
        captured, self._positions, self._captured = self._captured, None, {}
        missing = [layer for layer in self.layers if layer not in captured]
        if missing:
            raise RuntimeError(f"the forward pass never reached the attention output of layers {missing}")
        return torch.stack([captured[layer] for layer in self.layers], dim=1)
