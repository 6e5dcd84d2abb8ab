"""Beaver products whose backward pass reuses the forward pass's openings.

CrypTen differentiates z = x * y (elementwise, broadcasting), z = x @ y and z = x^2 as fresh
Beaver products, g * y and x * g: each opens both of its operands again, so a product's backward
pass opens four tensors (g twice, x and y once more), and it computes the gradient of a public or
constant operand too (then throws it away). Here one opening does it.

With the forward triple (a, b, c = a op b) the dealer also makes a mask r for the gradient, in the
shape of z, and two products in the shapes of the operands' gradients (for x @ y: r @ b^T and
a^T @ r; for x * y: r * b and a * r, summed over broadcast dims; for x^2, b = a and only a * r):

1. Forward (Beaver's): open e = x - a and d = y - b; z = c + e op b + a op d + e op d (the last
   term at party 0), then truncate.
2. Backward, given shares of z's gradient g: open f = g - r, the only opening; then each party
   computes locally from the public e, d, f and its shares of g, a, b and the dealer's products:
       dx = g op_x y = g op_x d + f op_x b + [r op_x b]       (op_x: g * y, or g @ y^T)
       dy = x op_y g = e op_y g + a op_y f + [a op_y r]       (op_y: x * g, or x^T @ g)
   and truncates both at once; only the gradients that some input needs are computed.
   x^2: dx = 2 (x * g).
   A public operand's product is local both ways (no triple, no gradient for it).

Security (semi-honest, as CrypTen's): e, d and f are each masked by a fresh uniformly random ring
element (a, b, r) used for no other opening, so each opening is uniform to every party; the
dealer's products are additive shares, uniform to any proper subset of the parties. The dealer
sees what it saw before: operation names and shapes.

Only with the TTP dealer; another provider (TFP), an operand without the usual fixed-point scale
(a 0/1 comparison result), a matmul of a vector, or active security uses CrypTen's own function.
`use(on)` (compat.reuse_openings calls it) puts these functions in CrypTen's autograd registry or
restores CrypTen's; `MpcOps(reuse_openings=...)` chooses (job key `mpc.reuse_openings`).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

OPS = ("mul", "matmul", "square")
DEALER_METHOD = "mpcft_reusable"  # the dealer's request name (offline.dealer_class serves it)
PROVIDER_METHOD = "mpcft_reusable_triple"  # the parties' side (compat adds it to CrypTen's TTP)


def _fn(op: str) -> Any:
    return torch.mul if op in ("mul", "square") else torch.matmul


def _grad_x(op: str, g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return g * y if op != "matmul" else g.matmul(y.transpose(-2, -1))


def _grad_y(op: str, x: torch.Tensor, g: torch.Tensor, size1: torch.Size) -> torch.Tensor:
    """x op_y g for an operand y of size `size1`; for a matrix y broadcast over x's leading
    dims (x [..., m, k] @ y [k, n]), their sum at once: one [k, rows] @ [rows, n] product, not
    a [..., k, n] batch of products to add up."""
    if op != "matmul":
        return x * g
    if x.dim() > 2 and len(size1) == 2:
        return x.reshape(-1, x.size(-1)).t().matmul(g.reshape(-1, g.size(-1)))
    return x.transpose(-2, -1).matmul(g)


def beaver_shares(fn: Any, e: torch.Tensor, d: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  c: torch.Tensor, first: bool) -> torch.Tensor:  # fmt: skip
    """This party's share of x fn y from the opened e = x - a, d = y - b and its shares of the
    triple (a, b, c = a fn b): c + e fn b + a fn d + e fn d, the last at the first party only,
    folded into e fn (b + d) there (fn is bilinear): two local products, not three."""
    return c + fn(e, b + d if first else b) + fn(a, d)


def sum_to(t: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Sum a broadcast result back to an operand's shape (exact in the ring)."""
    while t.dim() > len(size):
        t = t.sum(0)
    dims = [i for i, s in enumerate(size) if s == 1 and t.size(i) != 1]
    return t.sum(dims, keepdim=True) if dims else t


def product_size(op: str, size0: torch.Size, size1: torch.Size) -> torch.Size:
    if op == "square":
        return torch.Size(size0)
    meta = [torch.empty(s, dtype=torch.long, device="meta") for s in (size0, size1)]
    return _fn(op)(*meta).size()


def correlation_sizes(op: str, size0: torch.Size, size1: torch.Size) -> list[torch.Size]:
    """The shapes of the dealer's answer: c, then r op_x b (not for square), then a op_y r."""
    z = product_size(op, size0, size1)
    return [z, torch.Size(size0)] if op == "square" else [z, torch.Size(size0), torch.Size(size1)]


def dealer_answer(server: Any, op: str, size0: torch.Size, size1: torch.Size) -> torch.Tensor:
    """The dealer's side (a method of offline.dealer_class): party 0's shares of c, [r op_x b]
    and [a op_y r], flattened. Per generator the draws are a, b (not for square), r, then, for
    parties 1.., their shares of the products: the order of `reusable_triple`."""
    if op not in OPS:
        raise ValueError(f"unknown product {op!r}")
    a = server._get_additive_PRSS(size0)
    b = a if op == "square" else server._get_additive_PRSS(size1)
    c = _fn(op)(a, b)
    r = server._get_additive_PRSS(c.size())
    products = [c, sum_to(a * r, size0)] if op == "square" else [
        c, sum_to(_grad_x(op, r, b), size0), sum_to(_grad_y(op, a, r, size1), size1)]  # fmt: skip
    shares = [p - server._get_additive_PRSS(p.size(), remove_rank=True) for p in products]
    return torch.cat([s.reshape(-1) for s in shares])


def reusable_triple(provider: Any, op: str, size0: torch.Size, size1: torch.Size,
                    device: Any = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The parties' side (a method of CrypTen's TTP provider, so that CrypTen's tracing and
    offline.TripleCache serve it like any triple): this party's shares of a, b, r and of the
    dealer's products (module docstring), as int64 tensors."""
    import crypten.communicator as comm
    from crypten.common.rng import generate_random_ring_element
    from crypten.mpc.provider.ttp_provider import TTPClient

    client = TTPClient.get()
    generator = client.get_generator(device=device)

    def draw(size: torch.Size) -> torch.Tensor:
        return generate_random_ring_element(size, generator=generator, device=device)

    sizes = correlation_sizes(op, size0, size1)
    a = draw(size0)
    b = a if op == "square" else draw(size1)
    r = draw(sizes[0])
    if comm.get().get_rank() == 0:
        flat = client.ttp_request(DEALER_METHOD, device, op, size0, size1)
        products = list(torch.split(flat, [s.numel() for s in sizes]))
        products = [p.view(s) for p, s in zip(products, sizes, strict=True)]
    else:
        products = [draw(s) for s in sizes]
    if op == "square":
        products.append(products[1])  # square: a op_y r is the only correlation
    return (a, b, r, *products)


def open_masked(shares: list[torch.Tensor]) -> list[torch.Tensor]:
    """Open this party's shares of masked values (x - a, ...) in one exchange (compat 8)."""
    import crypten.communicator as comm

    return comm.get().all_reduce(shares, batched=True)


def dealer_correlations() -> bool:
    """Whether this project's dealer requests can be used: the TTP dealer, no active security
    (compare.py's bit pairs and the triples here; otherwise CrypTen's own protocol runs)."""
    import crypten

    provider = crypten.mpc.get_default_provider()
    return getattr(provider, "NAME", "") == "TTP" and not crypten.cfg.mpc.active_security


def _shared(like: Any, *shares: torch.Tensor) -> Any:
    """MPCTensors holding `shares` at `like`'s scale squared, truncated to `like`'s scale: one
    truncation for all (with 3+ parties each is a round: CrypTen's wrap count)."""
    from crypten.mpc import MPCTensor

    bits = like.encoder._precision_bits
    flat = torch.cat([t.reshape(-1) for t in shares]) if len(shares) > 1 else shares[0]
    out = MPCTensor.from_shares(flat, precision=bits)
    out._tensor.div_(like.encoder.scale)
    if len(shares) == 1:
        return out
    parts = torch.split(out._tensor.share, [t.numel() for t in shares])
    return [MPCTensor.from_shares(part.view(t.size()), precision=bits)
            for part, t in zip(parts, shares, strict=True)]  # fmt: skip


def _eligible(op: str, x: Any, y: Any) -> bool:
    from crypten.mpc import MPCTensor
    from crypten.mpc.ptype import ptype as Ptype

    if not dealer_correlations():
        return False
    operands = [x] if op == "square" else [x, y]
    for t in operands:
        if not isinstance(t, MPCTensor) or t.ptype != Ptype.arithmetic or t.is_cuda:
            return False
        if t.encoder.scale <= 1 or t.encoder.scale != x.encoder.scale:
            return False
    return op != "matmul" or (x.dim() >= 2 and y.dim() >= 2)


def _public_product(ctx: Any, op: str, x: Any, y: Any) -> Any:
    ctx.mpcft = ("public", op, y, x.size())
    return getattr(x, op)(y)


def _secret_product(ctx: Any, op: str, x: Any, y: Any) -> Any:
    import crypten
    import crypten.communicator as comm

    provider = crypten.mpc.get_default_provider()
    size1 = x.size() if op == "square" else y.size()
    a, b, r, c, corr_x, corr_y = getattr(provider, PROVIDER_METHOD)(
        op, x.size(), size1, device=x.device
    )
    xs = x._tensor.share
    if op == "square":
        (e,) = open_masked([xs - a])
        d = e
    else:
        e, d = open_masked([xs - a, y._tensor.share - b])
    z = beaver_shares(_fn(op), e, d, a, b, c, first=comm.get().get_rank() == 0)
    need_y = op != "square" and bool(getattr(y, "requires_grad", False))
    ctx.mpcft = ("secret", op, x.size(), size1, e, d, a, b, r, corr_x, corr_y,
                 bool(x.requires_grad), need_y)  # fmt: skip
    return _shared(x, z)


def _backward(ctx: Any, g: Any) -> tuple[Any, Any]:
    kind, op, *saved = ctx.mpcft
    del ctx.mpcft  # the node keeps its context after backward: free the masks now
    if kind == "public":
        y, size0 = saved
        from crypten.gradients import _inverse_broadcast

        grad = g.matmul(y.transpose(-2, -1)) if op == "matmul" else g.mul(y)
        return _inverse_broadcast(grad, size0), None
    size0, size1, e, d, a, b, r, corr_x, corr_y, need_x, need_y = saved
    gs = g._tensor.share
    (f,) = open_masked([gs - r])
    if op == "square":
        # 2 x g = 2 (e g + a f + [a r])
        return (_shared(g, (e * gs + a * f + corr_y) * 2) if need_x else None), None
    if need_x:
        dx = sum_to(_grad_x(op, gs, d) + _grad_x(op, f, b), size0) + corr_x
    if need_y:
        dy = sum_to(_grad_y(op, e, gs, size1) + _grad_y(op, a, f, size1), size1) + corr_y
    if need_x and need_y:
        return tuple(_shared(g, dx, dy))
    return (_shared(g, dx) if need_x else None), (_shared(g, dy) if need_y else None)


@cache
def autograd_functions() -> dict[str, type]:
    """name -> AutogradFunction for "mul", "matmul" and "square" (CrypTen's names)."""
    from crypten.gradients import FUNCTION_REGISTRY, AutogradFunction

    originals = {op: FUNCTION_REGISTRY[op] for op in OPS}

    def make(op: str) -> type:
        original = originals[op]

        class Product(AutogradFunction):
            @staticmethod
            def forward(ctx: Any, x: Any, y: Any = None) -> Any:
                from crypten import CrypTensor

                public = op != "square" and not isinstance(y, CrypTensor)
                if public and (op == "mul" or (torch.is_tensor(y) and y.dim() >= 2)):
                    return _public_product(ctx, op, x, y)
                if public or not _eligible(op, x, y):
                    ctx.mpcft_original = original
                    args = (x,) if op == "square" else (x, y)
                    return original.forward(ctx, *args)
                return _secret_product(ctx, op, x, y)

            @staticmethod
            def backward(ctx: Any, g: Any) -> Any:
                original = getattr(ctx, "mpcft_original", None)
                if original is not None:
                    return original.backward(ctx, g)
                dx, dy = _backward(ctx, g)
                return dx if op == "square" else (dx, dy)

        Product.__name__ = Product.__qualname__ = f"Reused{op.capitalize()}"
        Product.name = op
        return Product

    return {"originals": originals, "reused": {op: make(op) for op in OPS}}


def use(on: bool) -> None:
    """Put the reusing functions into CrypTen's autograd registry (on) or CrypTen's own back."""
    from crypten.gradients import FUNCTION_REGISTRY

    functions = autograd_functions()
    FUNCTION_REGISTRY.update(functions["reused" if on else "originals"])
