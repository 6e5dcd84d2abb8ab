"""CrypTensor attribute reads, dispatched as CrypTen does but without its per-read overhead
(compat patch 13).

Every attribute read of a CrypTensor (`x.share`, `x.size`, `x + y`'s `add`, ...) goes through
CrypTensor.__getattribute__, which decides whether the name is one of CrypTen's autograd
functions: a few hundred reads per operation, about 3,600 per native reference step. CrypTen's
version reads its class-level tables (`CrypTensor.PROTECTED_ATTRIBUTES`, a list scanned per
read, `PYTHON_BUILTIN`, `AUTOGRAD_ENABLED`) through its metaclass's Python __getattribute__ on
every read, and its debug wrapper (`register_validation`) reads `cfg.debug.validation_mode`:
about 3 us per read, 10 ms per step. `fast_reads` makes the same decisions in the same order from
tables bound once: a frozenset for the protected names, the live class dict for
AUTOGRAD_ENABLED (CrypTen's no_grad flips it there) and the live FUNCTION_REGISTRY (products.use
swaps entries in it). In-place names (`add_`, ...) keep CrypTen's own path.
"""

from __future__ import annotations

from typing import Any


def fast_reads() -> None:
    """Install the reads described in the module docstring; validation mode must be off
    (compat refuses it)."""
    from crypten.cryptensor import CrypTensor
    from crypten.gradients import FUNCTION_REGISTRY

    if getattr(CrypTensor, "_mpcft_fast_reads", False):
        return
    original = CrypTensor.__dict__["__getattribute__"]
    original = getattr(original, "__wrapped__", original)  # without the debug wrapper
    protected = frozenset(CrypTensor.PROTECTED_ATTRIBUTES) | {"copy_"}
    builtin = dict(CrypTensor.PYTHON_BUILTIN)
    required = frozenset(CrypTensor.REQUIRED_FUNCTIONS)
    state = CrypTensor.__dict__  # a live view: AUTOGRAD_ENABLED is set on this class
    plain = object.__getattribute__
    registered = FUNCTION_REGISTRY.get

    def getattribute(self: Any, name: str) -> Any:
        if name in protected:
            return plain(self, name)
        name = builtin.get(name, name)
        if name[-1:] == "_" and not name.endswith("__"):  # in place: CrypTen's own handling
            return original(self, name)
        grad_fn = registered(name)
        if grad_fn is None:  # size(), share, ...: not an autograd function
            return plain(self, name)
        if state["AUTOGRAD_ENABLED"]:
            if not hasattr(grad_fn, "forward"):
                raise NotImplementedError(
                    f"Autograd forward not implemented for {name}. Please use detach()."
                )
            return self._get_autograd_forward_function(name, grad_fn, False)
        try:
            return plain(self, name)
        except AttributeError:
            if name in required:
                raise
            return self._get_forward_function_no_ctx(grad_fn)

    getattribute.original = original  # type: ignore[attr-defined]  # for tests/test_compat.py
    CrypTensor.__getattribute__ = getattribute
    CrypTensor._mpcft_fast_reads = True
