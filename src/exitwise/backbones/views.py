"""Few-row views: a module whose ``nn.Linear`` products choose their kernel per call, without
intercepting any other operation and without changing the module (see
:mod:`exitwise.backbones.kernels` for which kernel and when).

A ``TorchFunctionMode`` sees *every* torch call made inside it; rerouting a decoder pass that
way costs a Python call per operation, which can cost more than the products gain. A view pays
only at the products: :func:`few_row_view` returns a shallow copy of the module tree in which
every scoped ``nn.Linear`` is a :class:`FewRowLinear` holding the *same* parameters, and every
other module is the original or a shallow copy whose child table points at views. The user's
modules, classes and globals are untouched; the view shares every parameter, buffer and
forward hook (in-place changes show through) and lives as long as the caller keeps it.

A view must not be used to change state: an attribute set on a copied module during its
forward stays on the copy. exitwise views only decoder blocks (the model's, or an exit head's
copies of them) and LM heads, which keep no state between calls (the KV cache is passed in).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: (x, weight) -> the kernel ``(x, weight, bias) -> out`` to use, or None for ``F.linear``
Chooser = Callable[[torch.Tensor, torch.Tensor], Callable[..., torch.Tensor] | None]


_SHARED_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


class FewRowLinear(nn.Linear):
    """The product of ``linear`` (the same weight and bias parameters) through the kernel
    ``choose`` picks for each call: x (..., in) -> (..., out)."""

    def __init__(self, linear: nn.Linear, choose: Chooser) -> None:
        nn.Module.__init__(self)  # no fresh weights: the original's are registered below
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self.choose = choose
        for hooks in _SHARED_HOOKS:  # the user's hooks on the original run on the view too
            self.__dict__[hooks] = linear.__dict__[hooks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.choose(x, self.weight)
        if kernel is None:
            return F.linear(x, self.weight, self.bias)
        return kernel(x, self.weight, self.bias)


def few_row_view(
    module: nn.Module, scoped: Callable[[nn.Linear], bool], choose: Chooser
) -> nn.Module:
    """``module`` itself when no ``nn.Linear`` under it is ``scoped``, else a view of it (see
    module doc) whose scoped linears are :class:`FewRowLinear` with ``choose``.

    Only modules of exactly ``nn.Linear`` are viewed: a subclass may compute more than
    ``F.linear`` in its forward, and keeps it."""
    if type(module) is nn.Linear:
        usable = isinstance(module.weight, nn.Parameter) and (
            module.bias is None or isinstance(module.bias, nn.Parameter))
        return FewRowLinear(module, choose) if usable and scoped(module) else module
    changed = {}
    for name, child in module._modules.items():
        if child is not None:
            view = few_row_view(child, scoped, choose)
            if view is not child:
                changed[name] = view
    if not changed:
        return module
    out = copy.copy(module)  # shares __dict__'s values: parameters, buffers, hooks, config
    out.__dict__["_modules"] = {**module._modules, **changed}
    return out
