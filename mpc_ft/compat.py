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
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

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
    crypten.cfg.mpc.provider = ep.provider
    crypten.cfg.encoder.precision_bits = ep.precision_bits
    crypten.cfg.communicator.verbose = True
    if ep.provider == "TFP":
        warnings.warn(
            "INSECURE: provider TFP lets party 0 generate every Beaver triple in the clear; "
            "use the TTP dealer for anything but experiments",
            stacklevel=3,
        )


def init_party(ep: PartyEndpoint, store: Any = None) -> types.ModuleType:
    """Join the job as computing party `ep.rank`; returns the initialised crypten module.

    `store`: the job's rendezvous store (control.py) to build the process group on; without
    it, CrypTen connects through the `ep.rendezvous` URL."""
    _check_endpoint(ep, dealer=False)
    crypten = import_crypten()
    _configure(crypten, ep)
    _register_autograd_functions(crypten)
    with _process_groups(ep.timeout_s, store):
        crypten.init()
    return crypten


def run_dealer(ep: PartyEndpoint, store: Any = None) -> None:
    """Serve Beaver triples as CrypTen's trusted third party until the parties finish.

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
    from crypten.mpc.provider.ttp_provider import TTPServer

    with _process_groups(ep.timeout_s, store):
        TTPServer()  # runs its request loop inside the constructor
    _shutdown_process_group()


def _shutdown_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shutdown() -> None:
    """Leave the job (party 0 also tells the dealer to stop)."""
    crypten = import_crypten()
    if crypten.is_initialized():
        crypten.uninit()


def communicator() -> Any:
    """CrypTen's communicator (for rank, groups and statistics)."""
    import crypten.communicator as comm

    return comm.get()


def communication_stats() -> dict[str, float]:
    """Bytes and rounds this party has sent since the last reset (CrypTen's own counters)."""
    stats = communicator().get_communication_stats()
    return {"bytes": int(stats["bytes"]), "rounds": int(stats["rounds"]), "time": stats["time"]}


def reset_communication_stats() -> None:
    communicator().reset_communication_stats()


@contextlib.contextmanager
def all_positive() -> Iterator[None]:
    """CrypTen setting: skip the sign test in `reciprocal` when inputs are known positive."""
    crypten = import_crypten()
    with crypten.cfg.temp_override({"functions.reciprocal_all_pos": True}):
        yield


_REGISTERED: set[str] = set()


def _register_autograd_functions(crypten: types.ModuleType) -> None:
    """Make mpc_ft's custom autograd functions (ops.py) callable as CrypTensor methods."""
    from crypten.gradients import FUNCTION_REGISTRY

    from mpc_ft import ops

    for name, cls in ops.mpc_autograd_functions().items():
        if name not in _REGISTERED:
            cls.name = name
            FUNCTION_REGISTRY[name] = cls
            _REGISTERED.add(name)
