"""CrypTen 0.4.1 on modern torch: every patch we need; the only module touching CrypTen's globals.

CrypTen keeps its configuration (`crypten.cfg`), its communicator and its tuple provider in
process-wide globals. Everything in mpc_ft that needs them goes through this module, so the rest of
the code receives plain arguments and stays importable without side effects.

Patches (each pinned by a test in tests/test_compat.py):
1. `import crypten` fails on torch >= 2.5: `crypten/nn/onnx_converter.py` imports
   `torch.onnx._internal.registration`, which torch removed. We put a stub module with
   `registry = None` into `sys.modules` before the import; mpc_ft never uses CrypTen's ONNX path.
2. CrypTen passes no timeout to gloo, so a frozen peer blocks the others for 30 minutes. We wrap
   `torch.distributed.init_process_group` and `new_group` with our timeout during CrypTen's init
   (and build the default group on the job's rendezvous store, already authenticated).
3. CrypTen silently runs alone (world size 1) or invents a random file rendezvous when the
   environment is incomplete. We always set RENDEZVOUS, WORLD_SIZE, RANK and DISTRIBUTED_BACKEND
   explicitly, and refuse a world size below 2.
4. Communication statistics are only recorded with `cfg.communicator.verbose`; we turn it on.
5. CrypTen's config reads and overrides go through OmegaConf in every operation (~15% of a
   party's CPU); `_fast_config` serves them from a plain namespace.
6. With the TTP provider, every party but 0 computes a throw-away product per Beaver triple
   to learn its shape; `_triples_without_dummy_products` takes the shape from meta tensors.
7. The dealer runs `offline.dealer_class()`: CrypTen's TTPServer plus a bulk request (a whole
   step's triples in one message) answered one step ahead (tests/test_offline.py).
8. Every opening of shares went through gloo's all_reduce, which costs about 1.3 ms per call on
   loopback even for one element (a send/receive pair: 0.16 ms), and every Beaver product and
   every AND of a comparison opens once: `messages.open_by_exchange` has each party send its
   shares, in one message, to every other and add (or XOR) what it receives (same result, same
   bytes with 2 parties; counted honestly with more).
9. CrypTen's Beaver product makes three local products per party (eps b, a delta, and eps delta
   at party 0); `_beaver_with_two_products` folds the third into the first (eps (b + delta) at
   party 0): the same shares, one product fewer.
10. CrypTen's autograd differentiates a product by two new Beaver products (four more openings)
   and also computes the gradient of a public operand; `reuse_openings(True)` registers
   products.py's functions instead (one opening per product's backward, from a triple with
   gradient correlations that the TTP provider and the dealer learn to make here).
11. `MPCTensor([])` (every clone, shallow copy and `from_shares`) was meant to make an empty
   shell, but its test `tensor is []` is never true, so each call encoded an empty tensor and
   drew a pseudo-random zero sharing of it; `_empty_mpc_tensors` takes the intended branch.
12. CrypTen's comparison (`MPCTensor._ltz`, behind <, >, relu, sign) adds the binary shares
   with a full 64-bit adder to read the top bit; `_sign_by_carry` computes only the carry into
   it, on packed bits (compare.py): a quarter of the bytes, the same rounds. Its bit goes back
   to arithmetic by a packed opening; the provider gains bit pairs for products by the bit.
13. Every attribute read of a CrypTensor (hundreds per operation) goes through CrypTen's debug
   wrapper, which reads `cfg.debug.validation_mode` each time, and reads CrypTen's class tables
   through its metaclass: about 3 us per read, 10 ms of a native step. mpc_ft never turns
   validation mode on; `dispatch.fast_reads` makes the same decisions from tables bound once.
14. With 3+ parties every truncation gathers the masked shares at party 0 through gloo's gather
   (a collective, slow as all_reduce); `messages.gather_by_messages` sends them directly.
15. The same truncation counts the wraps of a sum of shares with six comparisons and two
   conversions per term (`count_wraps`, twice per truncation at party 0); `_fast_wrap_counts`
   uses compare.count_wraps, the same counts from split halves, 2-3x faster (also the dealer's).
16. With exactly 3 parties that whole protocol is replaced (`truncation.install`): parties 0
   and 2 mask party 2's share with a seed they share, party 1 receives it, and the two shares
   left are divided locally as with 2 parties (one message, no dealer pair, no wrap counts).
17. With 2 parties (and 3 after that fold) each share is divided locally by an int64 division,
   about 2 ns per element; by a power of two, `truncation.divide_by_shifts` shifts instead,
   ten times faster, and rounds stochastically (unbiased, one unit at most).
18. CrypTen decodes a negative fixed-point integer by dividing it by scale - 1, not scale: a value
   v <= -2 within |v| - 1 units above an integer opens 1.0 too low (-14.99986 as -15.99986), about
   |v| / 65536 of them at 16 bits. `_exact_decoding` floors by the scale and adds the remainder.
19. gloo hands each message through its I/O thread (0.3-5 ms a small one here): the computing
   parties link by plain sockets (links.py) for openings, gathers, send and recv (messages.py).
20. CrypTen's generators are MT19937, predictable from 312 outputs (which one opening shows a
   party), its dealer's seeds came from torch's global generator: `randomness.install` makes each
   an AES-CTR stream under a 128-bit key from os.urandom (mpc_ft/randomness.py, offline.py).
21. A reveal to one party went through gloo's reduce, which leaves each party the plaintext of
   1/P of the tensor: `messages.reduce_by_gather` gathers the shares at that party instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import time
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from mpc_ft import dispatch, messages, randomness, truncation

PROVIDERS = ("TTP", "TFP")
_STUB_NAME = "torch.onnx._internal.registration"
INSTALL_HINT = (
    "CrypTen is not installed: run `make demo` (or `pip install --no-deps crypten==0.4.1`)"
)


def crypten_available() -> bool:
    """True when the crypten package is installed (without importing it)."""
    return importlib.util.find_spec("crypten") is not None


def import_crypten() -> types.ModuleType:
    """Import crypten with the torch-compatibility stub in place (patch 1)."""
    if "crypten" in sys.modules:
        return sys.modules["crypten"]
    if not crypten_available():
        raise ImportError(INSTALL_HINT) from None
    try:
        importlib.import_module(_STUB_NAME)
    except ImportError:
        stub = types.ModuleType(_STUB_NAME)
        stub.registry = None  # what onnx_converter reads at import; never used by mpc_ft
        sys.modules[_STUB_NAME] = stub
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CrypTen's own deprecation noise at import
        return importlib.import_module("crypten")


@dataclass(frozen=True)
class PartyEndpoint:
    """Where and who one process is in a CrypTen job.

    `world_size` counts computing parties only; with the TTP provider the dealer is one more
    process with rank == world_size (CrypTen's convention, kept inside this module).
    """

    rank: int
    world_size: int
    rendezvous: str
    provider: str = "TTP"
    precision_bits: int = 16
    timeout_s: float = 300.0
    socket_ifname: str | None = None
    address: str = "127.0.0.1"  # where this party's direct links listen (links.py)


def _check_endpoint(ep: PartyEndpoint, *, dealer: bool) -> None:
    if ep.provider not in PROVIDERS:
        raise ValueError(f"unknown provider {ep.provider!r}; expected one of {PROVIDERS}")
    if ep.world_size < 2:
        raise ValueError(f"world size {ep.world_size}: MPC needs at least 2 computing parties")
    if dealer and ep.provider != "TTP":
        raise ValueError("only the TTP provider has a dealer process")
    top = ep.world_size if dealer else ep.world_size - 1
    if not (0 <= ep.rank <= top) or (not dealer and ep.rank == ep.world_size):
        raise ValueError(f"rank {ep.rank} out of range for world size {ep.world_size}")
    if "://" not in ep.rendezvous:
        raise ValueError(f"rendezvous {ep.rendezvous!r} must be a URL like tcp://host:port")


@contextlib.contextmanager
def _process_groups(seconds: float, store: Any = None) -> Iterator[None]:
    """Patch 2: every process group CrypTen creates gets a finite timeout; with `store`, the
    default group is built on the job's own rendezvous store (control.py) instead of a URL."""
    import torch.distributed as dist

    timeout = timedelta(seconds=seconds)
    original_init, original_new = dist.init_process_group, dist.new_group

    def init(backend: str, init_method: str, world_size: int, rank: int) -> None:
        where = (
            {"init_method": init_method}
            if store is None
            else {"store": dist.PrefixStore("gloo/", store)}
        )
        original_init(backend=backend, world_size=world_size, rank=rank, timeout=timeout, **where)

    dist.init_process_group = init
    dist.new_group = functools.partial(original_new, timeout=timeout)
    try:
        yield
    finally:
        dist.init_process_group, dist.new_group = original_init, original_new


def _configure(crypten: types.ModuleType, ep: PartyEndpoint) -> None:
    """Patch 3 and 4: explicit environment and settings, never CrypTen's defaults."""
    os.environ.update(
        RENDEZVOUS=ep.rendezvous,
        WORLD_SIZE=str(ep.world_size),
        RANK=str(ep.rank),
        DISTRIBUTED_BACKEND="gloo",
    )
    if ep.socket_ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = ep.socket_ifname
    _fast_config(crypten)
    crypten.cfg.mpc.provider = ep.provider
    crypten.cfg.encoder.precision_bits = ep.precision_bits
    crypten.cfg.communicator.verbose = True
    if ep.provider == "TFP":
        warnings.warn(
            "INSECURE: provider TFP lets party 0 generate every Beaver triple in the clear; "
            "use the TTP dealer for anything but experiments",
            stacklevel=3,
        )


def _fast_config(crypten: types.ModuleType) -> None:
    """Patch 5: CrypTen reads `crypten.cfg` (an OmegaConf tree) in every operation and merges a
    new tree for every `temp_override` (reciprocal, exp, max: per call), ~15% of a party's CPU at
    the head's sizes. Now the values live in a plain nested namespace: reads are attribute
    lookups, overrides set and restore a value; same values and semantics for existing keys."""
    cls = type(crypten.cfg)
    if cls.__dict__.get("_mpcft_fast"):
        return
    from omegaconf import OmegaConf

    def values(self: Any) -> Any:
        state = object.__getattribute__(self, "__dict__")
        if "_mpcft_values" not in state:
            state["_mpcft_values"] = _namespace(OmegaConf.to_container(state["config"]))
        return state["_mpcft_values"]

    def lookup(node: Any, dotted: str) -> tuple[Any, str]:
        *path, last = dotted.split(".")
        for key in path:
            node = getattr(node, key)
        return node, last

    def getattribute(self: Any, name: str) -> Any:
        top = object.__getattribute__(self, "__dict__").get("_mpcft_values")
        if top is not None and name in top.__dict__:  # a section ("mpc", "debug", ...): no
            return top.__dict__[name]  # failed lookup and exception per read, as below
        try:
            return object.__getattribute__(self, name)
        except AttributeError:
            node, last = lookup(values(self), name)
            return getattr(node, last)

    def setattribute(self: Any, name: str, value: Any) -> None:
        if name == "config":
            object.__setattr__(self, name, value)
            object.__getattribute__(self, "__dict__").pop("_mpcft_values", None)
            return
        node, last = lookup(values(self), name)
        setattr(node, last, value)

    @contextlib.contextmanager
    def temp_override(self: Any, override_dict: dict[str, Any]) -> Iterator[None]:
        saved = []
        try:
            for dotted, value in override_dict.items():
                node, last = lookup(values(self), dotted)
                saved.append((node, last, getattr(node, last)))
                setattr(node, last, value)
            yield
        finally:
            for node, last, old in reversed(saved):
                setattr(node, last, old)

    cls.__getattribute__ = getattribute
    cls.__setattr__ = setattribute
    cls.temp_override = temp_override
    cls._mpcft_fast = True


def _triples_without_dummy_products() -> None:
    """Patch 6: CrypTen's TTP provider makes every party but party 0 multiply two random
    tensors only to learn the product's shape (a TODO in its code): one full int64 matmul per
    Beaver triple, thrown away. The shape comes from meta tensors instead; every random draw
    is the same, in the same order, so the shares still match the dealer's (a wrong share
    would break every product in tests/test_mpc_ops.py and test_mpc_training.py)."""
    import crypten.communicator as comm
    import torch
    from crypten.common.rng import generate_random_ring_element
    from crypten.mpc.primitives import ArithmeticSharedTensor
    from crypten.mpc.provider.ttp_provider import TrustedThirdParty, TTPClient

    if getattr(TrustedThirdParty, "_mpcft_meta_shapes", False):
        return

    def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):  # noqa: ANN001, ANN202
        generator = TTPClient.get().get_generator(device=device)
        a = generate_random_ring_element(size0, generator=generator, device=device)
        b = generate_random_ring_element(size1, generator=generator, device=device)
        if comm.get().get_rank() == 0:
            c = TTPClient.get().ttp_request("additive", device, size0, size1, op, *args, **kwargs)
        else:
            size = getattr(torch, op)(a.to("meta"), b.to("meta"), *args, **kwargs).size()
            c = generate_random_ring_element(size, generator=generator, device=device)
        return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in (a, b, c))

    TrustedThirdParty.generate_additive_triple = generate_additive_triple
    TrustedThirdParty._mpcft_meta_shapes = True


def _beaver_with_two_products() -> None:
    """Patch 9 (module docstring): CrypTen's Beaver protocol (crypten/mpc/primitives/beaver.py)
    for z = x op y with a triple (a, b, c = a op b): open eps = x - a and delta = y - b; then
    z = c + eps op b + a op delta + eps op delta, the last at party 0 only. Since op is bilinear,
    party 0 computes eps op (b + delta) instead (products.beaver_shares, which products.py's
    forward uses too): two local products where CrypTen makes three, bit for bit the same
    shares. Active security (not used) keeps CrypTen's own."""
    import crypten
    import crypten.communicator as comm
    import torch
    from crypten.mpc.primitives import ArithmeticSharedTensor, beaver

    from mpc_ft import products

    if getattr(beaver, "_mpcft_two_products", False):
        return
    originals = {op: getattr(beaver, op) for op in ("mul", "matmul")}

    def protocol(op: str) -> Any:
        def product(x: Any, y: Any) -> Any:  # mul and matmul take no further arguments
            if crypten.cfg.mpc.active_security:
                return originals[op](x, y)
            provider = crypten.mpc.get_default_provider()
            a, b, c = provider.generate_additive_triple(x.size(), y.size(), op, device=x.device)
            with beaver.IgnoreEncodings([a, b, x, y]):
                eps, delta = ArithmeticSharedTensor.reveal_batch([x - a, y - b])
            c.share = products.beaver_shares(
                getattr(torch, op),
                eps,
                delta,
                a.share,
                b.share,
                c.share,
                first=comm.get().get_rank() == 0,
            )
            return c

        return product

    for op in originals:
        setattr(beaver, op, protocol(op))
    beaver._mpcft_two_products = True


def _empty_mpc_tensors() -> None:
    """Patch 11 (module docstring): MPCTensor([]) as CrypTen meant it, an empty shell whose
    `_tensor` the caller replaces (all parties skip the same empty draws, so their generators
    stay in step)."""
    import torch
    from crypten.cryptensor import CrypTensor
    from crypten.mpc import MPCTensor
    from crypten.mpc.ptype import ptype as Ptype

    if getattr(MPCTensor, "_mpcft_empty", False):
        return
    original = MPCTensor.__init__

    def init(self, tensor, ptype=Ptype.arithmetic, device=None, *args, **kwargs):  # noqa: ANN001, ANN202
        if (
            isinstance(tensor, list)
            and not tensor
            and not args
            and set(kwargs) <= {"requires_grad"}
        ):
            CrypTensor.__init__(self, requires_grad=kwargs.get("requires_grad", False))
            self._tensor = torch.tensor([], device=device)
            self.ptype = ptype
            return
        original(self, tensor, ptype, device, *args, **kwargs)

    MPCTensor.__init__ = init
    MPCTensor._mpcft_empty = True


def _fast_attribute_reads(crypten: types.ModuleType) -> None:
    """Patch 13 (module docstring): dispatch.fast_reads, without CrypTen's validation wrapper
    (crypten/debug: `register_validation`), which only acts in validation mode."""
    if crypten.cfg.debug.validation_mode:
        raise RuntimeError("mpc_ft does not support CrypTen's debug validation mode")
    dispatch.fast_reads()


def _exact_decoding() -> None:
    """Patch 18 (module docstring): FixedPointEncoder.decode with the whole part floor(t / scale)
    for every sign, then the remainder t - whole scale in [0, scale) as a fraction."""
    from crypten.encoder import FixedPointEncoder

    original = FixedPointEncoder.decode
    if getattr(original, "_mpcft_exact", False):
        return

    def decode(self, tensor):  # noqa: ANN001, ANN202
        if tensor is None or self._scale <= 1:
            return original(self, tensor)
        whole = tensor.div(self._scale, rounding_mode="floor")
        return (whole.float() + (tensor - whole * self._scale).float() / self._scale).data

    decode._mpcft_exact = True
    FixedPointEncoder.decode = decode


def _fast_wrap_counts() -> None:
    """Patch 15 (module docstring): CrypTen's count_wraps, where its protocols imported it."""
    from crypten.mpc.primitives import beaver
    from crypten.mpc.provider import tfp_provider, ttp_provider

    from mpc_ft import compare

    for module in (beaver, ttp_provider, tfp_provider):
        module.count_wraps = compare.count_wraps


def _sign_by_carry() -> None:
    """Patch 12 (module docstring): MPCTensor._ltz of arithmetic shares by compare.ltz; the
    TTP provider gains compare.bit_pair (traceable, so offline.TripleCache fetches it ahead)."""
    from crypten.mpc import MPCTensor
    from crypten.mpc.provider.provider import TupleProvider
    from crypten.mpc.provider.ttp_provider import TrustedThirdParty
    from crypten.mpc.ptype import ptype as Ptype

    from mpc_ft import compare

    if getattr(MPCTensor, "_mpcft_carry", False):
        return
    TupleProvider.TRACEABLE_FUNCTIONS.append(compare.BIT_PROVIDER_METHOD)
    setattr(TrustedThirdParty, compare.BIT_PROVIDER_METHOD, compare.bit_pair)
    original = MPCTensor._ltz

    def ltz(self):  # noqa: ANN001, ANN202
        if self.ptype != Ptype.arithmetic or self.is_cuda:
            return original(self)
        return compare.ltz(self)

    MPCTensor._ltz = ltz
    MPCTensor._mpcft_carry = True


def reuse_openings(on: bool) -> None:
    """Patch 10 (module docstring): products.py's autograd functions for mul, matmul and square
    in CrypTen's registry (on), or CrypTen's own (off). The TTP provider gains the triples
    they use (traceable, so offline.TripleCache fetches them ahead like any other)."""
    from crypten.mpc.provider.provider import TupleProvider
    from crypten.mpc.provider.ttp_provider import TrustedThirdParty

    from mpc_ft import products

    if products.PROVIDER_METHOD not in TupleProvider.TRACEABLE_FUNCTIONS:
        TupleProvider.TRACEABLE_FUNCTIONS.append(products.PROVIDER_METHOD)
        setattr(TrustedThirdParty, products.PROVIDER_METHOD, products.reusable_triple)
    products.use(on)


def _namespace(tree: Any) -> Any:
    if isinstance(tree, dict):
        return types.SimpleNamespace(**{k: _namespace(v) for k, v in tree.items()})
    return tree


def init_party(ep: PartyEndpoint, store: Any = None) -> types.ModuleType:
    """Join the job as computing party `ep.rank`; returns the initialised crypten module.

    `store`: the job's rendezvous store (control.py) to build the process group on; without
    it, CrypTen connects through the `ep.rendezvous` URL."""
    _check_endpoint(ep, dealer=False)
    crypten = import_crypten()
    _configure(crypten, ep)
    randomness.install()  # first: patch 6 binds CrypTen's draw function
    _triples_without_dummy_products()
    messages.open_by_exchange()
    messages.gather_by_messages()
    messages.reduce_by_gather()
    messages.send_and_receive_directly()
    _fast_wrap_counts()
    truncation.install()
    _beaver_with_two_products()
    _empty_mpc_tensors()
    _sign_by_carry()
    _fast_attribute_reads(crypten)
    _exact_decoding()
    _register_autograd_functions(crypten)
    with _process_groups(ep.timeout_s, store):
        crypten.init()
        randomness.exchange_party_keys(crypten)
    messages.link_parties(ep.address, ep.timeout_s)
    return crypten


def run_dealer(ep: PartyEndpoint, store: Any = None, ahead: bool = True) -> None:
    """Serve Beaver triples as CrypTen's trusted third party until the parties finish
    (`ahead`: compute each bulk answer again while the parties run the step, offline.py).

    The dealer sees only random values it generates itself; it never receives data. It returns
    when party 0 sends CrypTen's terminate message (at party 0's `uninit`), and also, silently,
    when a peer's connection breaks (CrypTen's TTPServer swallows that RuntimeError): callers
    must check how the job ended (control.py does).
    """
    _check_endpoint(ep, dealer=True)
    if ep.rank != ep.world_size:
        raise ValueError("the dealer's rank must equal the number of computing parties")
    crypten = import_crypten()
    _configure(crypten, ep)
    _fast_wrap_counts()
    randomness.install()
    from mpc_ft.offline import dealer_class

    with _process_groups(ep.timeout_s, store):
        # Patch 7: CrypTen's TTPServer with a bulk request, answered one step ahead
        dealer_class()(ahead)  # runs its request loop inside the constructor
    _shutdown_process_group()


def _shutdown_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shutdown() -> None:
    """Leave the job (party 0 also tells the dealer to stop)."""
    crypten = import_crypten()
    if crypten.is_initialized():
        messages.unlink_parties()
        crypten.uninit()


def communicator() -> Any:
    """CrypTen's communicator (for rank, groups and statistics)."""
    import crypten.communicator as comm

    return comm.get()


def communication_stats() -> dict[str, float]:
    """Bytes and rounds this party has sent since the last reset (CrypTen's own counters)."""
    stats = communicator().get_communication_stats()
    return {"bytes": int(stats["bytes"]), "rounds": int(stats["rounds"]), "time": stats["time"]}


def reset_communication_stats() -> None:  # CrypTen's counters
    communicator().reset_communication_stats()


@contextlib.contextmanager
def all_positive() -> Iterator[None]:
    """CrypTen setting: skip the sign test in `reciprocal` when inputs are known positive."""
    crypten = import_crypten()
    with crypten.cfg.temp_override({"functions.reciprocal_all_pos": True}):
        yield


def _register_autograd_functions(crypten: types.ModuleType) -> None:
    """Make mpc_ft's custom autograd functions (ops.py) callable as CrypTensor methods."""
    from crypten.gradients import FUNCTION_REGISTRY

    from mpc_ft import ops

    for name, cls in ops.mpc_autograd_functions().items():
        cls.name = name
        FUNCTION_REGISTRY[name] = cls


@contextlib.contextmanager
def emulate_latency(seconds_per_round: float) -> Iterator[list[tuple[str, int, float]]]:
    """BENCHMARK EMULATION, not a network feature: sleep `seconds_per_round` once per round.

    A "round" is what CrypTen counts as one: a call of a communicator method decorated with its
    `_logging` (send, recv, all_reduce, broadcast, send_obj, ...). In the block every such call in
    this process sleeps first, then runs unchanged; CrypTen's statistics are not touched. It
    stands in for network latency where the kernel cannot add delay (no netem): a fixed wait per
    call, not per message, packet or byte (nothing of gloo's messages per call, TCP slow start
    or overlap with a late peer).

    Yields a list filled with one (method name, bytes, seconds) per round, in order: bytes as
    CrypTen counts them (its `comm_bytes`: `init_party` turns on `cfg.communicator.verbose`),
    seconds in the call after the delay. With 0 it only records. Patches this process's
    communicator class and restores it on exit; nested blocks add their delays up.
    """
    if seconds_per_round < 0:
        raise ValueError(f"negative delay {seconds_per_round}")
    import_crypten()
    from crypten.communicator.distributed_communicator import DistributedCommunicator as cls

    counted = {  # the methods wrapped by CrypTen's `_logging` (or by an enclosing emulation)
        name: method
        for name, method in vars(cls).items()
        if getattr(getattr(method, "__code__", None), "co_name", "") == "logging_wrapper"
        or getattr(method, "_counted_round", False)
    }
    if not counted:
        raise RuntimeError("CrypTen's communicator has no `_logging` methods: CrypTen changed?")
    calls: list[tuple[str, int, float]] = []

    def delayed(name: str, method: Any) -> Any:
        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if seconds_per_round:
                time.sleep(seconds_per_round)
            before, start = getattr(self, "comm_bytes", 0), time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                nbytes = int(getattr(self, "comm_bytes", 0) - before)
                calls.append((name, nbytes, time.perf_counter() - start))

        call._counted_round = True  # a nested emulation wraps this one again
        return call

    for name, method in counted.items():
        setattr(cls, name, delayed(name, method))
    try:
        yield calls
    finally:
        for name, method in counted.items():
            setattr(cls, name, method)
