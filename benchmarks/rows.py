"""One JSON row per benchmark case in benchmarks/results/: the only format the report reads.

    write_row("reference/mpc2/train", group="reference", config={...}, parties=2,
              seconds=[...], plaintext_seconds=[...], bytes_per_party=[...],
              rounds_per_party=[...])

Every row carries: case, group, config and its fingerprint, git revision, date, machine,
parties, provider, seconds (median, min, max, quartiles, runs), bytes and rounds per party per
run (CrypTen's own communication statistics), the plaintext twin's seconds for the same case
measured in the same process run, and their ratio. Extra keys (e.g. series/x for scaling
curves, bound for the cost model) pass through.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(os.environ.get("MPC_FT_BENCH_RESULTS", Path(__file__).parent / "results"))


def summary(seconds: list[float]) -> dict[str, Any]:
    """Median and spread of repeated timings (quartiles need at least 2 runs)."""
    s = sorted(seconds)
    quartiles = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "min": s[0], "max": s[-1],
            "q1": quartiles[0], "q3": quartiles[2], "runs": s}  # fmt: skip


def fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "system": platform.system()}  # fmt: skip


def git_revision() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent)  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=Path(__file__).parent)  # fmt: skip
    return proc.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or "unknown"


def write_row(
    case: str,
    *,
    group: str,
    config: dict[str, Any],
    parties: int,
    seconds: list[float] | None,
    provider: str = "TTP",
    plaintext_seconds: list[float] | None = None,
    bytes_per_party: list[float] | None = None,
    rounds_per_party: list[float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write (and return) one case's row; bytes and rounds are per run, per party. Rows that
    measure something other than time (e.g. a loss gap) pass seconds=None."""
    if seconds is not None and (not seconds or min(seconds) <= 0):
        raise ValueError(f"{case}: no positive timings")
    row = {
        "case": case,
        "group": group,
        "config": config,
        "fingerprint": fingerprint(config),
        "git_revision": git_revision(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "parties": parties,
        "provider": provider,
        "seconds": summary(seconds) if seconds else None,
        "bytes_per_party": bytes_per_party,
        "rounds_per_party": rounds_per_party,
        "plaintext_seconds": summary(plaintext_seconds) if plaintext_seconds else None,
        **extra,
    }
    if seconds and plaintext_seconds:
        row["ratio_to_plaintext"] = row["seconds"]["median"] / row["plaintext_seconds"]["median"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = case.replace("/", "__")
    (RESULTS / f"{name}.json").write_text(json.dumps(row, indent=2))
    return row


def read_rows(results: Path = RESULTS) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
