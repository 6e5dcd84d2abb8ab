"""Checkpoints of one computing party's shares, so that a failed job resumes instead of restarting.

Every `train.checkpoint_every` steps each computing party writes, on its own disk only:
`<out>/checkpoints/<party>/step-000040.pt` with its SHARES of the head and of the optimizer's
velocity, the epoch's metric terms so far (shares), the revealed history, the step (the data
cursor: the batch order is public and seeded) and the job fingerprint. A share alone is a
uniformly random ring element: a checkpoint tells whoever reads it nothing about the head.

- Atomic: written to a temporary file, flushed, then renamed; a crash leaves the old files.
- The newest KEEP files are kept (a peer may crash after this party wrote step k but before
  it did; the handshake then agrees on the newest step every party has).
- After training, every computing party also keeps its shares of the trained head
  (`<out>/head-shares/<party>.pt`, save_head) for private inference (infer.py).
- Not restored: CrypTen's random generators (fresh seeds at every start), so a resumed run
  matches an uninterrupted one within fixed-point error, not bit for bit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from mpc_ft.config import JobConfig
from mpc_ft.errors import BadInput
from mpc_ft.train import History, TrainState

KEEP = 2
_NAME = re.compile(r"^step-(\d{6,})\.pt$")


def directory(out_dir: Path, party: str) -> Path:
    return out_dir / "checkpoints" / party


def path_for(out_dir: Path, party: str, step: int) -> Path:
    return directory(out_dir, party) / f"step-{step:06d}.pt"


def steps(job: JobConfig, out_dir: Path, party: str) -> list[int]:
    """The steps this party holds checkpoints of, oldest first; BadInput for a file that is not
    a checkpoint of this party in this job (nothing is deleted)."""
    folder = directory(out_dir, party)
    found = []
    for path in sorted(folder.glob("step-*.pt")) if folder.is_dir() else []:
        match = _NAME.match(path.name)
        if not match:
            continue
        header = _read(path)
        if header.get("fingerprint") != job.fingerprint():
            theirs, ours = str(header.get("fingerprint"))[:12], job.fingerprint()[:12]
            raise BadInput(f"checkpoint {path} is from another job (fingerprint {theirs}, "
                           f"this job {ours}): move it away or use another --out")  # fmt: skip
        if header.get("party") != party or header.get("step") != int(match.group(1)):
            raise BadInput(f"checkpoint {path} holds party {header.get('party')!r} step "
                           f"{header.get('step')}, not what its name says")  # fmt: skip
        found.append(int(match.group(1)))
    return found


def save(job: JobConfig, out_dir: Path, party: str, state: TrainState) -> Path:
    """Write this party's shares at state.step atomically; drop all but the newest KEEP."""
    record = {
        "fingerprint": job.fingerprint(),
        "party": party,
        "step": state.step,
        "params": {k: _share(v) for k, v in state.params.items()},
        "velocity": {k: _share(v) for k, v in state.velocity.items()},
        "seen": [[_share(t) for t in terms] for terms in state.seen],
        "history": vars(state.history),
    }
    path = path_for(out_dir, party, state.step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in steps(job, out_dir, party)[:-KEEP]:
        path_for(out_dir, party, old).unlink()
    return path


def load(job: JobConfig, out_dir: Path, party: str, step: int, crypten: Any,
         ops: Any) -> TrainState:  # fmt: skip
    """This party's state at `step`, its shares back in CrypTensors (parameters as leaves)."""
    path = path_for(out_dir, party, step)
    if step not in steps(job, out_dir, party):
        raise BadInput(f"party {party!r} has no checkpoint {path}")
    record = _read(path)
    precision = job.precision_bits

    def tensor(share: torch.Tensor) -> Any:
        return crypten.mpc.MPCTensor.from_shares(share, precision=precision)

    return TrainState(
        params={k: ops.leaf(tensor(v)) for k, v in record["params"].items()},
        velocity={k: tensor(v) for k, v in record["velocity"].items()},
        step=record["step"],
        history=History(**record["history"]),
        seen=[tuple(tensor(t) for t in terms) for terms in record["seen"]],
    )


def _share(value: Any) -> torch.Tensor:
    """This party's share (int64 ring elements) of a CrypTensor."""
    return value.share.clone()


def _read(path: Path) -> dict[str, Any]:
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input, named
        raise BadInput(f"checkpoint {path} cannot be read ({type(e).__name__}): a torn or "
                       "foreign file; move it away") from None  # fmt: skip
    if not isinstance(record, dict):
        raise BadInput(f"checkpoint {path} is not an mpc-ft checkpoint")
    return record


def head_path(out_dir: Path, party: str) -> Path:
    return out_dir / "head-shares" / f"{party}.pt"


def save_head(job: JobConfig, out_dir: Path, party: str, params: dict[str, Any],
              backbone: str) -> Path:  # fmt: skip
    """This party's shares of the trained head, for private inference (infer.py); `backbone`:
    the identity of the backbone the head was trained on (the handshake's)."""
    path = head_path(out_dir, party)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"fingerprint": job.fingerprint(), "party": party, "backbone": backbone,
              "params": {k: _share(v) for k, v in params.items()}}  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(record, tmp)
    os.replace(tmp, path)
    return path


def load_head(job: JobConfig, out_dir: Path, party: str, crypten: Any) -> tuple[dict, str]:
    """(this party's shares of the trained head as CrypTensors, the backbone identity)."""
    path = head_path(out_dir, party)
    if not path.is_file():
        raise BadInput(f"party {party!r} has no shares of a trained head at {path} (train with "
                       "this job and --out first)")  # fmt: skip
    record = _read(path)
    if record.get("fingerprint") != job.fingerprint() or record.get("party") != party:
        raise BadInput(f"{path} holds party {record.get('party')!r}'s head of another job")
    params = {k: crypten.mpc.MPCTensor.from_shares(v, precision=job.precision_bits)
              for k, v in record["params"].items()}  # fmt: skip
    return params, record["backbone"]
