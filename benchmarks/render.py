"""Render BENCHMARKS.md and its plots from the JSON rows in benchmarks/results/.

    python -m benchmarks.render [--results DIR] [--out BENCHMARKS.md] [--plots DIR]
    python -m benchmarks.render --only federated   # re-render that section in place (below)

`make bench` runs the suite and then this. Every number comes from a row; the only figures not
measured by this suite are the peer figures of shared/DESIGN.md, marked as such.
The federated comparison also goes into README.md, between its generated-block markers, when
rendering the default BENCHMARKS.md. `--only federated` replaces just that block in both files
(after `pytest benchmarks/test_federated.py` alone), leaving the other sections as they are.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.rows import RESULTS, read_rows

ROOT = Path(__file__).parent.parent
MIB = 2**20
# shared/DESIGN.md: the reference head measured elsewhere on this kind of machine.
PEERS = [
    ("SecretFlow SPU 0.9.5, 2-party SEMI2K", 2.62, 156, 1000),
    ("CrypTen 0.4.1 written the obvious way, 2 parties", 1.77, 276, 436),
]


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} us"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _spread(row: dict) -> str:
    s = row["seconds"]
    return (
        f"{_s(s['median'])} [{_s(s['min'])}-{_s(s['max'])}]"
        if len(s["runs"]) > 1
        else _s(s["median"])
    )


def _mib(values: list[float] | None) -> str:
    return " / ".join(f"{v / MIB:.1f}" for v in values) if values else "-"


def _rounds(values: list[float] | None) -> str:
    return " / ".join(f"{v:.0f}" for v in values) if values else "-"


def _ratio(row: dict) -> str:
    return f"{row['ratio_to_plaintext']:.0f}x" if row.get("ratio_to_plaintext") else "-"


def _plain(row: dict) -> str:
    return _s(row["plaintext_seconds"]["median"]) if row.get("plaintext_seconds") else "-"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(line) + " |" for line in lines
    ]


def _reference_order(row: dict) -> tuple:
    return row.get("variant", ""), row["parties"], row["case"]


def reference_section(rows: list[dict]) -> list[str]:
    ref = [r for r in rows if r["group"] == "reference"]
    if not ref:
        return []
    out = ["## Reference head (shared/DESIGN.md)", "",
           "One post-LN block, width 128, batch 16, 32 tokens, 2 heads, FFN 256, 2 classes, SGD. "
           "MPC: computing parties plus the dealer (TTP), one thread each. Seconds: median "
           "[min-max] over the repeats of party 0; MiB and rounds: per party (party 0 first; it "
           "also talks to the dealer), from CrypTen's own counters.", ""]  # fmt: skip
    lines = [[f"{r.get('variant', 'exact')}, {r['parties']} parties", r["case"].split("/")[-1],
              _spread(r), _plain(r),
              _ratio(r), _mib(r["bytes_per_party"]), _rounds(r["rounds_per_party"])]
             for r in sorted(ref, key=_reference_order)]  # fmt: skip
    out += _table(["setup", "phase", "MPC", "plaintext", "MPC / plaintext", "MiB per party",
                   "rounds per party"], lines)  # fmt: skip
    out += ["", "Measured elsewhere with the same configuration (shared/DESIGN.md), for "
            "comparison with the `step` rows above:", ""]  # fmt: skip
    out += _table(["system", "s per step", "MiB per party", "rounds per party"],
                  [[n, f"{s:.2f}", f"{m}", f"~{r}"] for n, s, m, r in PEERS])  # fmt: skip
    ratios = sorted((r for r in rows if r["group"] == "party_ratio"), key=lambda r: r["variant"])
    if ratios:
        out += [
            "",
            "The online step (triples ahead) with 3 parties against 2, measured "
            "alternately in one run (three times 2 parties, 2 parties beside one more busy "
            "process, 3 parties; 10 repeats each), so that a busy spell on this shared machine "
            "falls on all; medians of all repeats. The busy process (int64 products in a loop) "
            "makes the shortage of cores that a third party makes on a machine with fewer "
            "cores than busy processes, without its messages: 3 parties against that arm is "
            "what the third party costs beyond the cores. Last, the CPU seconds of the busiest "
            "party per step (median), 3 parties against 2: about the ratio on a machine with a "
            "core per party, if no party waited for messages (not measured here).",
            "",
        ]
        out += _table(["setup", "2 parties", "2 parties + 1 busy process", "3 parties", "3 / 2",
                       "3 / (2 + busy)", "busiest party's CPU: 2, 3 parties"],
                      [_party_ratio_cells(r) for r in ratios])  # fmt: skip
    wild = [r for r in rows if r["group"] == "accuracy" and "wild" in r]
    if wild:
        out += [
            "",
            "Forward passes of the exact head whose logits are off by more than 1.0 "
            "(CrypTen's truncation fails with probability ~|x| 2^(2 bits - 64) per element: "
            "about 1 forward in 5 at 20 fractional bits; 16, the default, is measured here):",
            "",
        ]
        out += _table(["parties", "wild forwards", "largest error of the others"],
                      [[str(r["parties"]), f"{r['wild']} of {r['forwards']}",
                        f"{max([e for e in r['forward_errors'] if e <= 1.0] or [0]):.1e}"]
                       for r in wild])  # fmt: skip
    gaps = [r for r in rows if r["group"] == "accuracy" and "loss_gap" in r]
    if gaps:
        out += ["", "Loss before each training step, MPC vs the plaintext twin (same initial "
                "weights and batch):", ""]  # fmt: skip
        out += _table(["parties", "MPC loss", "plaintext loss", "largest gap", "wild values"],
                      [[str(r["parties"]), ", ".join(f"{x:.4f}" for x in r["loss_mpc"]),
                        ", ".join(f"{x:.4f}" for x in r["loss_plaintext"]),
                        f"{max(r['loss_gap']):.1e}", str(r.get("outliers", 0))]
                       for r in gaps])  # fmt: skip
    return out + [""]


def _party_ratio_cells(row: dict) -> list[str]:
    """One party_ratio row's cells; "-" for the arms a row from an older revision lacks."""

    def median(key: str) -> str:
        return _s(statistics.median(row[key])) if key in row else "-"

    busy = f"{row['ratio_busy']:.2f}x" if "ratio_busy" in row else "-"
    cpu = "-"
    if "ratio_cpu" in row:
        cpu = f"{median('cpu_two')}, {median('cpu_three')}: {row['ratio_cpu']:.2f}x"
    return [row["variant"], median("seconds_two"), median("seconds_two_busy"),
            _s(row["seconds"]["median"]), f"{row['ratio']:.2f}x", busy, cpu]  # fmt: skip


def component_section(rows: list[dict], plots: Path, base: Path) -> list[str]:
    comp = [r for r in rows if r["group"] == "component"]
    if not comp:
        return []
    out = ["## Components of the reference step", "",
           "Each component alone at its shape in the step, forward and backward. Share of the "
           "step: the component's forward+backward time (bytes) times the number of times it "
           "runs in a step, over the step's, measured in the same run; the rest of the step is "
           "glue (reshapes, residual adds, the update). Model: the cost model's count for the "
           "forward pass (mpc_ft/cost_model.py; the communication CrypTen's protocol needs at "
           "these shapes, tested equal to its counters); measured / model for the last party.",
           ""]  # fmt: skip
    lines = []
    for r in sorted(comp, key=lambda r: (r["parties"], r["component"], r["phase"])):
        bound = r.get("bound")
        ratio = "-"
        if bound and bound.get("bytes") and r["bytes_per_party"]:
            measured = r["bytes_per_party"][-1]
            ratio = f"{measured / bound['bytes']:.2f} bytes, " + (
                f"{r['rounds_per_party'][-1] / bound['rounds']:.2f} rounds"
                if bound.get("rounds") else "-")  # fmt: skip
        share = r.get("share_of_step") or {}
        lines.append([f"{r['parties']}p", r["component"], r["phase"], _s(r["seconds"]["median"]),
                      _plain(r), _ratio(r), _mib(r["bytes_per_party"]),
                      _rounds(r["rounds_per_party"]), ratio,
                      f"{share.get('seconds', 0):.0%} time, {share.get('bytes', 0):.0%} bytes, "
                      f"{share.get('rounds', 0):.0%} rounds"
                      if r["phase"] == "forward" else ""])  # fmt: skip
    out += _table(["", "component", "phase", "MPC", "plaintext", "ratio", "MiB per party",
                   "rounds per party", "measured / model", "share of step (fwd+bwd, x count)"],
                  lines)  # fmt: skip
    path = _plot_components(comp, plots)
    if path:
        out += ["", f"![share of the step per component]({os.path.relpath(path, base)})"]
    return out + [""]


def _plot_components(comp: list[dict], plots: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_parties: dict[int, dict[str, float]] = defaultdict(dict)
    for r in comp:
        if r["phase"] == "forward" and r.get("share_of_step"):
            by_parties[r["parties"]][r["component"]] = r["share_of_step"]["seconds"]
    if not by_parties:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = sorted({c for shares in by_parties.values() for c in shares})
    width = 0.8 / len(by_parties)
    for i, (parties, shares) in enumerate(sorted(by_parties.items())):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [100 * shares.get(n, 0) for n in names], width, label=f"{parties} parties")
    ax.set_xticks([j + width * (len(by_parties) - 1) / 2 for j in range(len(names))], names,
                  rotation=20, fontsize=8)  # fmt: skip
    ax.set_ylabel("% of the step's time")
    ax.set_title("Reference step: time per component (forward + backward, x occurrences)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plots.mkdir(parents=True, exist_ok=True)
    path = plots / "components.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_section(rows: list[dict], plots: Path, base: Path) -> list[str]:
    scaling = [r for r in rows if r["group"] == "scaling"]
    if not scaling:
        return []
    series: dict[str, list[dict]] = defaultdict(list)
    for r in scaling:
        series[r["series"]].append(r)
    out = ["## Scaling", "",
           "The reference training step with one dimension varied (d_model varies FFN = 2 "
           "d_model; `examples` is one epoch in batches of 16, reveals included). 2 computing "
           "parties plus the dealer unless the series is `parties`.", ""]  # fmt: skip
    lines = []
    for name, points in series.items():
        for r in sorted(points, key=lambda r: r["x"]):
            lines.append(
                [
                    name,
                    str(r["x"]),
                    _spread(r),
                    _plain(r),
                    _ratio(r),
                    _mib(r["bytes_per_party"][:1]),
                    _rounds(r["rounds_per_party"][:1]),
                ]
            )
    out += _table(["series", "x", "MPC", "plaintext", "ratio", "MiB (party 0)",
                   "rounds (party 0)"], lines)  # fmt: skip
    path = _plot_scaling(series, plots)
    if path:
        out += ["", f"![scaling curves]({os.path.relpath(path, base)})"]
    return out + [""]


def _plot_scaling(series: dict[str, list[dict]], plots: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(10, 5.5))
    for ax, (name, points) in zip(axes.flat, series.items(), strict=False):
        points = sorted(points, key=lambda r: r["x"])
        xs = [r["x"] for r in points]
        ax.plot(xs, [r["seconds"]["median"] for r in points], "o-", label="MPC")
        ax.fill_between(xs, [r["seconds"]["min"] for r in points],
                        [r["seconds"]["max"] for r in points], alpha=0.2)  # fmt: skip
        ax2 = ax.twinx()
        ax2.plot(xs, [r["bytes_per_party"][0] / MIB for r in points], "s--", color="tab:orange",
                 label="MiB (party 0)")  # fmt: skip
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("s", fontsize=8)
        ax2.set_ylabel("MiB", fontsize=8, color="tab:orange")
        ax.set_ylim(bottom=0)
        ax2.set_ylim(bottom=0)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.suptitle("MPC training step (o, left axis) and MiB sent by party 0 (s, right axis)")
    fig.tight_layout()
    plots.mkdir(parents=True, exist_ok=True)
    path = plots / "scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def links_section(rows: list[dict]) -> list[str]:
    links = [r for r in rows if r["group"] == "links"]
    if not links:
        return []
    out = ["## Direct links against gloo (mpc_ft/links.py)", "",
           "The same processes time the same work with their direct links up, then down (gloo "
           "carries the messages instead), alternately; idle dealer. Party 0's seconds: median "
           "(90th percentile).", ""]  # fmt: skip
    lines = [[r["what"], str(r["parties"]),
              f"{_s(statistics.median(r['seconds_gloo']))} ({_s(r['p90_gloo'])})",
              f"{_s(r['seconds']['median'])} ({_s(r['p90'])})", f"{r['gloo_over_links']:.2f}x"]
             for r in sorted(links, key=lambda r: (r["what"], r["parties"]))]  # fmt: skip
    return out + _table(["work", "parties", "gloo", "links", "gloo / links"], lines) + [""]


def phases_section(rows: list[dict]) -> list[str]:
    phases = [r for r in rows if r["group"] == "phases"]
    if not phases:
        return []
    cfg = phases[0]["config"]
    out = ["## Demo phases", "",
           f"`mpc-ft demo`: {cfg['train_examples']} training and {cfg['test_examples']} test "
           f"examples, {cfg['epochs']} epochs, batch {cfg['batch_size']}, {cfg['backbone']}; "
           "alice + bob + the dealer as separate processes.", ""]  # fmt: skip
    lines = [[r["phase"], _spread(r), _plain(r), _ratio(r)] for r in phases]
    return out + _table(["phase", "seconds", "plaintext twin", "ratio"], lines) + [""]


def accuracy_section(rows: list[dict]) -> list[str]:
    study = [r for r in rows if r["group"] == "accuracy_study"]
    if not study:
        return []
    cfg = study[0]["config"]
    out = ["## Exact vs MPC-native head: accuracy", "",
           f"Rotten Tomatoes, {cfg['train']} training examples, {cfg['test']} held-out test "
           "examples (other movies), all-MiniLM-L6-v2 layer 4, the demo's head and training "
           "settings. Twins are plaintext; `native-mpc` is the native head trained and "
           "evaluated under MPC (2 parties + dealer).", ""]  # fmt: skip
    lines = [
        [
            r["variant"],
            ", ".join(f"{a:.2%}" for a in r["accuracies"]),
            f"{r['accuracy_mean']:.2%}",
            f"{r['twin_accuracy']:.2%}" if r.get("twin_accuracy") is not None else "-",
            _s(sum(r["seconds"]["runs"])) if r.get("seconds") else "-",
        ]
        for r in study
    ]
    return out + _table(["head", "accuracy per seed", "mean", "its twin (same seed)",
                         "MPC training time"], lines) + [""]  # fmt: skip


def network_section(rows: list[dict]) -> list[str]:
    net = [r for r in rows if r["group"] == "network"]
    if not net:
        return []
    out = [
        "## LAN and WAN (emulated)",
        "",
        "The reference training step with each party in its own network namespace, "
        "bandwidth shaped by `tc tbf` and latency added per communication round by a "
        "labelled wrapper around CrypTen's communicator (benchmarks/test_network.py). "
        "Predicted: the unshaped step + rounds x per-round delay + bytes / bandwidth.",
        "",
    ]
    lines = [
        [
            r["profile"],
            f"{r['bandwidth_bit_s'] / 1e6:g} Mbit/s",
            f"{r['rtt_s'] * 1000:g} ms",
            _s(statistics.median(r["loopback_seconds"])),
            _spread(r),
            _s(r["predicted_seconds"]),
            f"{r['measured_over_predicted']:.2f}",
            _mib(r["bytes_per_party"]),
            _rounds(r["rounds_per_party"]),
        ]
        for r in net
    ]
    return out + _table(["profile", "bandwidth", "RTT", "unshaped step", "measured step",
                         "predicted", "measured / predicted", "MiB per party",
                         "rounds per party"], lines) + [""]  # fmt: skip


FEDERATED_START = "<!-- federated-table: generated by benchmarks/render.py, do not edit -->"
FEDERATED_END = "<!-- /federated-table -->"
METHOD_NAMES = {"federated": "federated (MPC aggregation)", "mpc": "full MPC training",
                "plaintext": "plaintext twin (pooled)"}  # fmt: skip


def learned(row: dict) -> str:
    """What the parties learn, summarised from the row's reveal log."""
    if row["reveals"] is None:
        return "everything: one place holds every owner's features and labels"
    counts: dict[tuple[str, str], int] = {}
    for entry in row["reveals"]:
        what = re.sub(r"^(round|epoch|watchdog step) \d+:?\s*", "", entry["what"])
        if entry["what"].startswith("watchdog step"):
            what = "overflow-watchdog count (0 unless the arithmetic broke)"
        what = what or "mean loss and accuracy"
        what = {"averaged update": "averaged update (so the global head)",
                "mean loss and accuracy per local epoch": "mean loss and accuracy",
                "total training examples within [federated.min_examples, max_examples]":
                "total examples in range (1 bit)"}.get(what, what)  # fmt: skip
        key = ("all" if entry["to"] == "all" else entry["to"], what)
        counts[key] = counts.get(key, 0) + 1
    parts: dict[str, list[str]] = defaultdict(list)
    for (to, what), n in counts.items():
        parts[to].append(f"{n} x {what}" if n > 1 else what)
    return "; ".join(f"{to}: {', '.join(whats)}" for to, whats in parts.items())


def federated_table(rows: list[dict]) -> list[str]:
    """The comparison, between markers (also spliced into README.md); [] without rows."""
    fed = [r for r in rows if r["group"] == "federated"]
    if not fed:
        return []
    cfg = fed[0]["config"]
    out = [f"Rotten Tomatoes, {cfg['train']} training and {cfg['test']} held-out test examples, "
           "the demo's MPC-native head; every method makes the same passes over the data "
           f"(full MPC and the pooled twin: {cfg['epochs']} epochs; federated: {cfg['rounds']} "
           f"rounds of {cfg['local_epochs']} local epoch(s)). Label mix: each owner's share of "
           "label 0. Time: party 0, from the first shared value to the test accuracy (the twin: "
           "training, one thread); MiB: sent per party (party 0 also talks to the dealer). "
           "Accuracy in brackets: the method's plaintext twin (federated: the same rounds with "
           "the exact average).", ""]  # fmt: skip
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    lines = []
    for r in sorted(fed, key=lambda r: (r["owners"], r["split"], order[r["method"]])):
        mix = ", ".join(f"{x:.2f}" for x in r["label0_share"])
        accuracy = f"{r['accuracy']:.1%} ({r['twin_accuracy']:.1%})"
        lines.append([str(r["owners"]), f"{r['split']} ({mix})", METHOD_NAMES[r["method"]],
                      accuracy, _s(r["seconds"]["median"]), _mib(r["bytes_per_party"]),
                      learned(r)])  # fmt: skip
    out += _table(["owners", "split (label mix)", "method", "accuracy (twin)", "time",
                   "MiB per party", "what the parties learn"], lines)  # fmt: skip
    return [FEDERATED_START, *out, FEDERATED_END]


FEDERATED_HEADING = ["## Federated mode vs full MPC training", ""]


def federated_section(rows: list[dict]) -> list[str]:
    table = federated_table(rows)
    return [*FEDERATED_HEADING, *table, ""] if table else []


def splice(path: Path, block: list[str], preamble: list[str] | None = None) -> None:
    """Replace the generated block (markers included) in `path`; if it has none, append the
    preamble (a heading) and the block."""
    text = path.read_text() if path.exists() else ""
    new = "\n".join(block).rstrip("\n")
    if FEDERATED_START in text and FEDERATED_END in text:
        head, rest = text.split(FEDERATED_START, 1)
        text = head + new + rest.split(FEDERATED_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join([*(preamble or []), new]) + "\n"
    path.write_text(text)


def render(results: Path = RESULTS, out: Path = ROOT / "BENCHMARKS.md",
           plots: Path = ROOT / "benchmarks" / "plots") -> str:  # fmt: skip
    rows = read_rows(results)
    if not rows:
        raise SystemExit(f"no benchmark rows in {results}: run `make bench` first")
    revisions = sorted({r["git_revision"] for r in rows})
    dates = sorted(r["date"] for r in rows)
    machine = rows[0]["machine"]
    text = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (benchmarks/render.py) from the rows in "
        "benchmarks/results/; do not edit by hand.",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}",
        f"- measured: {dates[0]} to {dates[-1]}; revision(s): {', '.join(revisions)}",
        f"- rows: {len(rows)}; median seconds over the repeats, [min-max] spread",
        "",
    ]
    text += reference_section(rows)
    text += component_section(rows, plots, out.parent)
    text += scaling_section(rows, plots, out.parent)
    text += accuracy_section(rows)
    text += phases_section(rows)
    text += links_section(rows)
    text += network_section(rows)
    text += federated_section(rows)
    out.write_text("\n".join(text))
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--plots", type=Path, default=ROOT / "benchmarks" / "plots")
    parser.add_argument("--only", choices=("federated",), help="re-render one section in place")
    args = parser.parse_args()
    readme = ROOT / "README.md" if args.out == ROOT / "BENCHMARKS.md" else None
    if args.only:
        block = federated_table(read_rows(args.results))
        if not block:
            raise SystemExit(f"no federated rows in {args.results}")
        splice(args.out, block, FEDERATED_HEADING)
        print(f"updated the federated section of {args.out}")
        if readme is not None:
            splice(readme, block)
            print(f"updated the federated table in {readme}")
        return
    render(args.results, args.out, args.plots)
    print(f"wrote {args.out}")
    block = federated_table(read_rows(args.results))
    if readme is not None and block:
        splice(readme, block)
        print(f"updated the federated table in {readme}")


if __name__ == "__main__":
    main()
