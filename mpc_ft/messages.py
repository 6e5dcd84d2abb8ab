"""CrypTen's openings and gathers as direct messages between the computing parties (compat
patches 8 and 14; compat.init_party applies them).

gloo's collectives cost about 1.3 ms per call on loopback even for one element (a send/receive
pair: 0.16 ms), and every Beaver product, every AND of a comparison and, with 3+ parties, every
truncation (CrypTen's wrap count gathers the masked shares at party 0) makes one.

- Opening (`all_reduce` with SUM, or XOR for binary shares): each party sends its shares of all
  the tensors, in one message, to each other party, then receives theirs and adds (XORs) them.
  `xor_from=k` (batched): the tensors from the k-th on are XORed, the others added: openings of
  arithmetic and binary shares in one exchange (rounds.py).
  With 2 parties that is what a ring all_reduce sends (n elements each way) in one exchange
  instead of gloo's several steps. With P > 2 each party sends (P - 1) n elements instead of the
  ring's 2 (P - 1) / P n, for one exchange instead of 2 (P - 1) steps; CrypTen's counter logs
  2 n per call, so the difference is added to its byte count. Other reductions: gloo's.
- Gather to one party: each other party sends it its tensor; the same bytes as gloo's gather.
- Reveal to one party (`reduce`, CrypTen's get_plain_text(dst=k)): a gather of the shares at k,
  which adds (XORs) them; the others receive nothing. gloo's reduce is a ring reduce-scatter
  first: every party ends up holding the plaintext sum of its 1/P of the tensor before it sends
  that on to k, so a reveal of the trained head to the model owner showed each other party part
  of every weight, and `mpc-ft infer` the client's predicted labels (patch 21).
- Messages between two computing parties (CrypTen's send and recv: the 3-party fold of
  truncation.py).

All of these travel over the parties' direct links (links.py; `link_parties`, at start-up), not
gloo, which costs 0.3-0.9 ms per small message on these machines; without links (or for
CrypTen's receive from any source) gloo carries them, as before.
"""

from __future__ import annotations

from typing import Any

LINKS = "_mpcft_links"  # the communicator's attribute holding this party's links.Links


def open_by_exchange() -> None:
    """Patch 8: DistributedCommunicator.all_reduce by direct exchange (module docstring)."""
    import crypten
    import torch
    import torch.distributed as dist
    from crypten.communicator.communicator import _logging
    from crypten.communicator.distributed_communicator import DistributedCommunicator as cls

    if getattr(cls, "_mpcft_exchange", False):
        return
    original = cls.all_reduce.__wrapped__  # under CrypTen's `_logging`, which counts the call

    def all_reduce(self, input, op=dist.ReduceOp.SUM, batched=False, xor_from=None):  # noqa: A002, ANN001, ANN202
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.BXOR):
            return original(self, input, op=op, batched=batched)
        tensors = [t.data for t in (input if batched else [input])]
        parts = [t.reshape(-1) for t in tensors]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]  # one message per peer
        # elements [0, split) are added, [split, n) XORed
        if xor_from is not None:
            split = sum(t.numel() for t in tensors[:xor_from])
        else:
            split = 0 if op == dist.ReduceOp.BXOR else flat.numel()
        rank, size = self.get_rank(), self.get_world_size()
        peers = [p for p in range(size) if p != rank]
        received = [torch.empty_like(flat) for _ in peers]
        links = _links(self, flat)
        if links is not None:  # every peer's message at once (links.py)
            inbox = {p: t.numpy() for p, t in zip(peers, received, strict=True)}
            links.exchange(dict.fromkeys(peers, flat.numpy()), inbox)
        else:
            sends = [dist.isend(flat, p, group=self.main_group) for p in peers]
            for p, t in zip(peers, received, strict=True):
                dist.recv(t, p, group=self.main_group)
            for request in sends:
                request.wait()
        total = None
        for t in received:
            total = _combine(flat if total is None else total, t, split, total is None)
        sizes = [t.numel() for t in tensors]
        results = [part.view(t.size()) for part, t in zip(total.split(sizes), tensors, strict=True)]
        if size > 2 and crypten.cfg.communicator.verbose:  # what `_logging` counted: 2 n
            extra = 2 * (size - 2) * sum(t.nelement() for t in tensors)
            self.comm_bytes += extra * self.BYTES_PER_ELEMENT
        return results if batched else results[0]

    cls.all_reduce = _logging(all_reduce)
    cls._mpcft_exchange = True


def _links(communicator: Any, tensor: Any) -> Any:
    """The communicator's direct links, if it has them and `tensor` is in CPU memory."""
    links = getattr(communicator, LINKS, None)
    return links if links is not None and tensor.device.type == "cpu" else None


def _combine(acc: Any, received: Any, split: int, fresh: bool) -> Any:
    """acc + received on elements [0, split) (int64: wraps modulo 2^64, as the shares do),
    acc ^ received on the rest; in place unless `fresh` (acc is then this party's own message,
    which may still be on its way to a peer)."""
    import torch

    if split == acc.numel():
        return acc + received if fresh else acc.add_(received)
    if split == 0:
        return acc ^ received if fresh else acc.bitwise_xor_(received)
    out = torch.empty_like(acc) if fresh else acc
    torch.add(acc[:split], received[:split], out=out[:split])
    torch.bitwise_xor(acc[split:], received[split:], out=out[split:])
    return out


def gather_by_messages() -> None:
    """Patch 14: DistributedCommunicator.gather by one message from each party to `dst`
    (module docstring); returns what CrypTen's does: the list at dst, [None] elsewhere."""
    import torch
    import torch.distributed as dist
    from crypten.communicator.communicator import _logging
    from crypten.communicator.distributed_communicator import DistributedCommunicator as cls

    if getattr(cls, "_mpcft_gather", False):
        return

    def gather(self, tensor, dst):  # noqa: ANN001, ANN202
        data = tensor.data.contiguous()
        links = _links(self, data)
        if self.get_rank() != dst:
            if links is not None:
                links.exchange({dst: data.numpy()}, {})
            else:
                dist.send(data, dst, group=self.main_group)
            return [None]
        result = []
        for rank in range(self.get_world_size()):
            if rank == dst:
                result.append(data.clone())
            else:
                result.append(torch.empty_like(data, dtype=torch.long))
                if links is None:
                    dist.recv(result[-1], rank, group=self.main_group)
        if links is not None:
            links.exchange({}, {r: t.numpy() for r, t in enumerate(result) if r != dst})
        return result

    cls.gather = _logging(gather)
    cls._mpcft_gather = True


def reduce_by_gather() -> None:
    """Patch 21: DistributedCommunicator.reduce as a gather of the shares at `dst`, which adds
    (or XORs) them (module docstring); returns what CrypTen's does: the result at dst, None
    elsewhere. Rounds and bytes are counted by the gather, once per tensor."""
    import torch.distributed as dist
    from crypten.communicator.distributed_communicator import DistributedCommunicator as cls

    if getattr(cls, "_mpcft_reduce", False):
        return

    def reduce_one(self, tensor, dst, op):  # noqa: ANN001, ANN202
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.BXOR):
            raise ValueError(f"reveal by gather: reduction {op} is neither SUM nor BXOR")
        shares = self.gather(tensor, dst)
        if self.get_rank() != dst:
            return None
        result = shares[0].clone()
        for share in shares[1:]:
            result = result + share if op == dist.ReduceOp.SUM else result ^ share
        return result

    def reduce(self, input, dst, op=dist.ReduceOp.SUM, batched=False):  # noqa: A002, ANN001, ANN202
        if not batched:
            return reduce_one(self, input, dst, op)
        results = [reduce_one(self, tensor, dst, op) for tensor in input]
        return results if self.get_rank() == dst else None

    cls.reduce = reduce
    cls._mpcft_reduce = True


def send_and_receive_directly() -> None:
    """Patch 19: CrypTen's send and recv (to or from a named computing party) over the direct
    links, when they are up; otherwise, and for a receive from any source, CrypTen's own."""
    import torch
    from crypten.communicator.communicator import _logging
    from crypten.communicator.distributed_communicator import DistributedCommunicator as cls

    if getattr(cls, "_mpcft_direct", False):
        return
    original_send, original_recv = cls.send.__wrapped__, cls.recv.__wrapped__

    def send(self, tensor, dst):  # noqa: ANN001, ANN202
        links = _links(self, tensor)
        if links is None:
            return original_send(self, tensor, dst)
        links.exchange({dst: tensor.data.contiguous().numpy()}, {})
        return None

    def recv(self, tensor, src=None):  # noqa: ANN001, ANN202
        links = _links(self, tensor)
        if links is None or src is None:
            return original_recv(self, tensor, src)
        result = torch.empty_like(tensor.data, memory_format=torch.contiguous_format)
        links.exchange({}, {src: result.numpy()})  # CrypTen's clone: overwritten anyway
        return result

    cls.send, cls.recv = _logging(send), _logging(recv)
    cls._mpcft_direct = True


def link_parties(address: str, timeout_s: float) -> None:
    """Connect this computing party's direct links (links.py step 1) to every other computing
    party of the initialised CrypTen job; the dealer (CrypTen's TTP process) has none."""
    import crypten.communicator as comm

    from mpc_ft import links

    channel = comm.get()
    setattr(channel, LINKS, links.connect(channel, address, timeout_s))


def unlink_parties() -> None:
    """Close this party's direct links (before CrypTen's uninit)."""
    import crypten.communicator as comm

    channel = comm.get()
    links = getattr(channel, LINKS, None)
    if links is not None:
        links.close()
        delattr(channel, LINKS)
