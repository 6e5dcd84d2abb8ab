"""Triples ahead of time: an offline phase in which the dealer makes a whole step's Beaver
triples in one request, so that the step itself (the online phase) never waits on the dealer.

CrypTen's TTP provider asks the dealer for each triple when it needs it: party 0 sends a request
and waits for the dealer's share, hundreds of round trips per step (the reference head's step:
591 of party 0's 788 rounds). A training step makes the same requests every time (the shapes are
fixed), so, per `TripleCache.step()`:

1. Record (first step): the step runs as usual while CrypTen's provider traces its requests.
2. Offline (before every later step): every party replays the recorded requests through the
   provider, drawing its own shares of a, b (and c, but for party 0) from the generators it
   shares with the dealer, as always. Party 0's calls to the dealer are collected instead of
   sent, each answered by an empty tensor of the right shape; then party 0 sends them all in
   one message, the dealer computes them in order (its generators stay in step with the
   parties') and answers with one tensor, which party 0 copies into the empty ones.
3. Online: the step takes its triples from the cache. A request the cache lacks (another shape,
   such as a short last batch, or the overflow watchdog) goes to the dealer as before.

What the dealer sees does not change: shapes and operation names, never data.

The dealer (`dealer_class`, run by compat.run_dealer) is CrypTen's TTPServer with one more
request, the bulk one, and one change to its loop: right after answering a bulk request it
computes the answer to the same request again, while the parties run the step, and keeps it
with its generators' states from before. If the next request is that bulk request, the answer
is ready; if it is anything else (a request the cache missed), the generators are rolled back
and the request is served as usual, so every random draw stays in step with the parties'.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from mpc_ft import compare, products, randomness

BULK = "mpcft_bulk"  # the dealer's method for a list of requests (compat patches it in)


def result_size(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Size:
    """The shape of the dealer's answer to one TTP call, from its arguments alone."""
    if name == "additive":  # (size0, size1, op, *op args): the product's shape, on meta tensors
        size0, size1, op, *rest = args
        a = torch.empty(size0, dtype=torch.long, device="meta")
        b = torch.empty(size1, dtype=torch.long, device="meta")
        return getattr(torch, op)(a, b, *rest, **kwargs).size()
    if name == "binary":
        return torch.broadcast_shapes(args[0], args[1])
    if name in ("square", "wraps", "B2A"):
        return torch.Size(args[0])
    if name == compare.BIT_DEALER_METHOD:  # (size, count): compare.bit_pair_answer, flat
        return torch.Size([torch.Size(args[0]).numel() * (1 + args[1])])
    if name == products.DEALER_METHOD:  # (op, size0, size1): products.dealer_answer, flat
        return torch.Size([sum(s.numel() for s in products.correlation_sizes(*args))])
    raise ValueError(f"unknown dealer call {name!r}")


def serve_bulk(server: Any, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> Any:
    """The dealer's answer to a bulk request: every call's result, in order, flattened into
    one tensor (TTPServer's loop sends its size, then the tensor, as for any call)."""
    results = [getattr(server, name)(*args, **kwargs).reshape(-1) for name, args, kwargs in calls]
    return torch.cat(results) if results else torch.zeros(0, dtype=torch.long)


class _LiveKeys:
    def __init__(self, tuples: dict) -> None:
        self.tuples = tuples

    def __contains__(self, request: Any) -> bool:
        return bool(dict.get(self.tuples, request))


class _Tuples(dict):
    """CrypTen's tuple cache (request -> tuples left). CrypTen keeps a request whose tuples are
    used up and then fails on it (`pop from empty list`); here it reads as absent, so the
    request goes to the dealer."""

    def keys(self) -> Any:  # CrypTen asks `request in cache.keys()`
        return _LiveKeys(self)


def dealer_class() -> type:
    """CrypTen's TTPServer serving bulk requests, one step ahead (module docstring; with
    `ahead=False` only when asked, so that its work never overlaps a step: benchmarks use it to
    time the online phase alone on a shared machine), the triples with gradient correlations
    of products.py and compare.py's bit pairs; its constructor runs the request loop until
    party 0 says "terminate" or a link breaks."""
    import crypten
    import crypten.communicator as comm
    import torch.distributed as dist
    from crypten.mpc.provider.ttp_provider import TTPServer

    class Dealer(TTPServer):
        def __init__(self, ahead: bool = True) -> None:  # TTPServer.__init__; `serve` loops
            self.works_ahead = ahead
            crypten.init()
            self.ttp_group = comm.get().ttp_group
            self.comm_group = comm.get().ttp_comm_group
            self.device = "cpu"
            self._setup_generators()
            try:
                self.serve()
            except RuntimeError as err:  # as TTPServer: a broken link ends the loop quietly
                logging.info("dealer stopping: %s", err)

        def _setup_generators(self) -> None:
            """TTPServer's, with a key from os.urandom and a KeyStream per party (randomness.py)
            for its seed from torch's global generator, which any code may seed: `mpc-ft party`
            once seeded it with 0, and every party's shares of every triple followed from a
            constant (tests/test_offline.py)."""
            keys = [randomness.new_key() for _ in range(comm.get().get_world_size())]
            sends = [dist.isend(randomness.key_tensor(key), dst=i, group=self.ttp_group)
                     for i, key in enumerate(keys)]  # fmt: skip
            self.generators = [randomness.KeyStream(key) for key in keys]
            self.generators_cuda = [None] * len(keys)  # CPU only
            for send in sends:
                send.wait()
            dist.barrier(group=self.ttp_group)

        def serve(self) -> None:
            ahead: tuple[Any, list[torch.Tensor], torch.Tensor] | None = None
            while True:
                message = comm.get().recv_obj(0, self.ttp_group)
                if message == "terminate":
                    return
                name, args, kwargs = message["function"], message["args"], message["kwargs"]
                self.device = message["device"]
                if ahead is not None and name == BULK and args == (ahead[0],):
                    result = ahead[2]
                else:
                    if ahead is not None:  # not the request computed ahead: roll back
                        for generator, state in zip(self.generators, ahead[1], strict=True):
                            generator.set_state(state)
                    result = getattr(self, name)(*args, **kwargs)
                ahead = None
                comm.get().send_obj(result.size(), 0, self.ttp_group)
                comm.get().broadcast(result, comm.get().get_ttp_rank(), self.comm_group)
                if name == BULK and self.works_ahead:  # the next step will most likely ask the same
                    states = [g.get_state() for g in self.generators]
                    ahead = (args[0], states, serve_bulk(self, args[0]))

    setattr(Dealer, BULK, serve_bulk)
    setattr(Dealer, products.DEALER_METHOD, products.dealer_answer)
    setattr(Dealer, compare.BIT_DEALER_METHOD, compare.bit_pair_answer)
    return Dealer


class TripleCache:
    """One training loop's offline phase (module docstring): `with cache.step(): ...`, or
    `begin()` and `end()` around the step. `seconds` and `fills` total the offline work; under
    TFP (no dealer) nothing happens."""

    def __init__(self, crypten: Any) -> None:
        self.crypten = crypten
        self.requests: list[Any] | None = None
        self.seconds = 0.0
        self.fills = 0

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    def begin(self) -> None:
        """Before a step: start recording (first step), else fill the cache for it."""
        provider = self.crypten.mpc.get_default_provider()
        if getattr(provider, "NAME", "") != "TTP":
            return
        if self.requests is None:  # record this step's requests (it runs as usual)
            provider.request_cache = []
            provider.trace(True)
            return
        start = time.perf_counter()
        self._fill(provider)
        self.seconds += time.perf_counter() - start
        self.fills += 1

    def end(self) -> None:
        """After a step: keep what the first step requested; drop what a step left unused."""
        provider = self.crypten.mpc.get_default_provider()
        if getattr(provider, "tracing", False):
            provider.trace(False)
            self.requests, provider.request_cache = list(provider.request_cache), []
        provider.tuple_cache = _Tuples()

    def _fill(self, provider: Any) -> None:
        import crypten.communicator as comm
        from crypten.mpc.provider.ttp_provider import TTPClient

        provider.tuple_cache = _Tuples()
        client = TTPClient.get()
        first = comm.get().get_rank() == 0
        calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        answers: list[torch.Tensor] = []

        def collect(name: str, device: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append((name, args, kwargs))
            answers.append(torch.empty(result_size(name, args, kwargs), dtype=torch.long))
            return answers[-1]

        if first:
            client.ttp_request = collect  # shadows the method on this instance
        try:
            provider.request_cache = self.requests
            provider.fill_cache()
        finally:
            provider.request_cache = []
            if first:
                del client.ttp_request
        if first and calls:
            flat = client.ttp_request(BULK, None, calls)
            offset = 0
            for answer in answers:
                answer.copy_(flat[offset : offset + answer.numel()].view_as(answer))
                offset += answer.numel()
            if offset != flat.numel():
                raise RuntimeError(f"the dealer answered {flat.numel()} values, not {offset}")
