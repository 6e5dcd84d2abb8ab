"""The end-of-run report: validate and write ``report.json``, print a summary, plot the losses.

A report is one flat mapping that compares the classifier head trained under MPC with its
plaintext twin. Every key in :data:`REQUIRED_KEYS` must be present; extra keys (for example
``accuracy_mpc_per_epoch``, ``provider`` or ``head``) are kept as they are. Files are written
atomically (a temporary file in the same folder, then ``os.replace``), so a crash never leaves
a half-written ``report.json`` or ``loss.png`` behind. matplotlib is imported only inside
:func:`plot_losses`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REQUIRED_KEYS: tuple[str, ...] = (
    "fingerprint",
    "parties",
    "backbone",
    "dataset",
    "train_examples",
    "test_examples",
    "num_classes",
    "epochs",
    "steps",
    "accuracy_mpc",
    "accuracy_plaintext",
    "loss_mpc",
    "loss_plaintext",
    "seconds_features",
    "seconds_mpc_train",
    "seconds_plaintext_train",
    "seconds_total",
    "bytes_sent_per_party",
    "rounds_per_party",
)

_STR_KEYS = ("fingerprint", "backbone", "dataset")
_INT_MINIMUM = {"train_examples": 0, "test_examples": 0, "num_classes": 2, "epochs": 1, "steps": 0}
_ACCURACY_KEYS = ("accuracy_mpc", "accuracy_plaintext")
_SECONDS_KEYS = tuple(key for key in REQUIRED_KEYS if key.startswith("seconds_"))
_COUNT_KEYS = ("bytes_sent_per_party", "rounds_per_party")
# Per-epoch lists: the losses are required, the per-epoch accuracies are optional extras. Under
# DP (dp_epsilon set) they may be empty: no training metric is revealed (dp.py).
_EPOCH_LIST_KEYS = ("loss_mpc", "loss_plaintext") + tuple(f"{k}_per_epoch" for k in _ACCURACY_KEYS)
# Optional DP keys (dp.report_keys): all None without DP; under DP numbers, except dp_epsilon,
# None when the gradients are clipped but not noised (no guarantee; strict JSON has no inf).
_DP_NUMBER_KEYS = ("dp_epsilon", "dp_delta", "noise_multiplier", "max_grad_norm")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _bad(key: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"report key {key!r}: expected {expected}, got {value!r}")


def _check_parties(parties: Any) -> None:
    if not isinstance(parties, list) or not parties:
        raise ValueError("report key 'parties': expected a non-empty list of {name, roles}")
    for i, party in enumerate(parties):
        ok = (
            isinstance(party, Mapping)
            and isinstance(party.get("name"), str)
            and bool(party["name"])
            and isinstance(party.get("roles"), list)
            and all(isinstance(role, str) for role in party["roles"])
        )
        if not ok:
            raise ValueError(
                f"report key 'parties': entry {i} must be {{'name': str, 'roles': [str, ...]}},"
                f" got {party!r}"
            )


def validate_report(report: Mapping[str, Any]) -> None:
    """Check that ``report`` has every required key with a sensible type and value.

    Raises ``ValueError`` naming the missing keys, or the first key whose type or value is
    wrong (an accuracy outside [0, 1], a negative duration, a per-epoch list whose length is
    not ``epochs``, a non-finite number, ...).
    """
    missing = [key for key in REQUIRED_KEYS if key not in report]
    if missing:
        raise ValueError(f"report is missing keys: {', '.join(missing)}")
    for key in _STR_KEYS:
        if not isinstance(report[key], str) or not report[key]:
            raise _bad(key, "a non-empty str", report[key])
    _check_parties(report["parties"])
    for key, minimum in _INT_MINIMUM.items():
        if not _is_int(report[key]) or report[key] < minimum:
            raise _bad(key, f"an int >= {minimum}", report[key])
    for key in _ACCURACY_KEYS:
        if not _is_number(report[key]) or not 0.0 <= report[key] <= 1.0:
            raise _bad(key, "a float in [0, 1]", report[key])
    for key in _SECONDS_KEYS:
        if not _is_number(report[key]) or report[key] < 0:
            raise _bad(key, "a float >= 0", report[key])
    for key in _DP_NUMBER_KEYS:
        value = report.get(key)
        if value is None:
            continue
        if not _is_number(value) or value < 0:
            raise _bad(key, "None or a number >= 0", value)
    dp = report.get("max_grad_norm") is not None
    epochs = report["epochs"]
    for key in _EPOCH_LIST_KEYS:
        if key not in report:
            continue
        values = report[key]
        if not isinstance(values, list) or not all(_is_number(v) for v in values):
            raise _bad(key, "a list of finite floats", values)
        if len(values) != epochs and not (dp and values == []):
            raise ValueError(
                f"report key {key!r}: has {len(values)} values, expected one per epoch ({epochs})"
            )
        if key.startswith("accuracy") and not all(0.0 <= v <= 1.0 for v in values):
            raise _bad(key, "accuracies in [0, 1]", values)
    for key in _COUNT_KEYS:
        counts = report[key]
        if not isinstance(counts, Mapping) or not all(
            isinstance(name, str) and _is_int(n) and n >= 0 for name, n in counts.items()
        ):
            raise _bad(key, "{party name: int >= 0}", counts)


def _atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_name)`` on a temp file next to ``path``, then move it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Validate ``report`` and write it to ``out_dir/report.json`` atomically; return the path.

    The JSON is indented by 2 with sorted keys and is strict (no NaN or Infinity).
    """
    validate_report(report)
    text = json.dumps(dict(report), indent=2, sort_keys=True, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return _atomic_write(Path(out_dir) / "report.json", write)


def _basename(name: str) -> str:
    stripped = name.rstrip("/\\")
    return stripped.replace("\\", "/").rsplit("/", 1)[-1] or name


def _last_loss(losses: list[float]) -> str:
    return f"{losses[-1]:.4f}" if losses else "- (DP)"


def _percent(accuracy: float) -> str:
    return f"{100 * accuracy:.1f}%"


def _accuracy_gap(report: Mapping[str, Any]) -> str:
    gap = round(100 * (report["accuracy_mpc"] - report["accuracy_plaintext"]), 1) + 0.0
    return f"MPC - plaintext accuracy: {gap:+.1f} points"


def summary_table(report: Mapping[str, Any]) -> str:
    """Return a plain-text, aligned table comparing the MPC run with its plaintext twin."""
    validate_report(report)
    header = (
        f"Dataset {report['dataset']} | backbone {_basename(report['backbone'])} | "
        f"{report['train_examples']} train / {report['test_examples']} test examples | "
        f"{report['epochs']} epochs, {report['steps']} steps"
    )
    mpc_s, plain_s = report["seconds_mpc_train"], report["seconds_plaintext_train"]
    rows: list[tuple[str, str, str]] = [
        ("Accuracy", _percent(report["accuracy_mpc"]), _percent(report["accuracy_plaintext"])),
        ("Final loss", _last_loss(report["loss_mpc"]), _last_loss(report["loss_plaintext"])),
        ("Training time (s)", f"{mpc_s:.1f}", f"{plain_s:.1f}"),
    ]
    if report.get("seconds_mpc_offline"):  # within the training time: offline.py
        rows.append(("  of which offline (s)", f"{report['seconds_mpc_offline']:.1f}", "-"))
    if report.get("max_grad_norm") is not None:
        eps = "none (no noise)"
        if report["dp_epsilon"] is not None:
            eps = f"{report['dp_epsilon']:.2f}, delta {report['dp_delta']:g}"
        rows.append(("DP epsilon", eps, eps))
        rows.append(("DP noise, clip", f"{report['noise_multiplier']:.3f}, "
                     f"{report['max_grad_norm']:g}", "same"))  # fmt: skip
    sent, rounds = report["bytes_sent_per_party"], report["rounds_per_party"]
    names = [party["name"] for party in report["parties"]]
    names += sorted((set(sent) | set(rounds)) - set(names))
    for name in names:
        mib = f"{sent[name] / 2**20:.2f}" if name in sent else "-"
        rows.append((f"{name}: MiB sent", mib, "-"))
        rows.append((f"{name}: rounds", str(rounds[name]) if name in rounds else "-", "-"))
    columns = [("", "MPC", "Plaintext"), *rows]
    widths = [max(len(row[i]) for row in columns) for i in range(3)]
    lines = [header, ""]
    for i, (label, mpc, plain) in enumerate(columns):
        lines.append(f"{label:<{widths[0]}}  {mpc:>{widths[1]}}  {plain:>{widths[2]}}")
        if i == 0:
            lines.append("-" * (sum(widths) + 4))
    lines.append("")
    lines.append(_accuracy_gap(report))
    lines.append(
        f"Feature extraction {report['seconds_features']:.1f} s, "
        f"whole run {report['seconds_total']:.1f} s"
    )
    return "\n".join(lines)


def plot_losses(report: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Plot the per-epoch training loss, MPC vs plaintext, to ``out_dir/loss.png``; return it."""
    validate_report(report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = list(range(1, report["epochs"] + 1))
    few = len(epochs) <= 30  # markers on short runs, so a single epoch still shows
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        # The twin is drawn dashed and thinner on top, so both show even when the curves overlap.
        if report["loss_mpc"]:  # empty under DP: nothing revealed during training
            ax.plot(epochs, report["loss_mpc"], "o-" if few else "-", ms=7, lw=2.2, label="MPC")
        if report["loss_plaintext"]:
            ax.plot(epochs, report["loss_plaintext"], "s--" if few else "--", ms=4,
                    label="Plaintext")  # fmt: skip
        if len(epochs) <= 12:  # MaxNLocator falls back to fractions on very short ranges
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, len(epochs) + 0.5)
        ax.set_xlabel("Epoch")
        ax.set_ylabel("Mean training loss")
        ax.set_title(
            f"{report['dataset']}: training loss per epoch\nfinal accuracy: MPC "
            f"{_percent(report['accuracy_mpc'])}, plaintext "
            f"{_percent(report['accuracy_plaintext'])}"
        )
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend()
        fig.tight_layout()
        return _atomic_write(Path(out_dir) / "loss.png", lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
