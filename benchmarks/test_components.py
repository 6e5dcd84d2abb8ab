"""Each component of the reference step alone, forward and backward, MPC vs plaintext.

    make bench   (or: .venv/bin/pytest benchmarks/test_components.py)

Shapes are those the component has inside the reference step (benchmarks/workloads.py). Each
row also carries the component's share of the reference step: its time (and bytes, rounds)
times the number of times it runs in a step, over the step's, measured in the same run.
"""

from __future__ import annotations

import pytest

from benchmarks.measure import measure, pick, write_phase_row
from benchmarks.workloads import (
    COMPONENTS,
    REFERENCE,
    component_build,
    component_run,
    head_build,
    head_run,
    occurrences,
)
from mpc_ft import cost_model


def _bound(component: str, parties: int) -> dict | None:
    """The cost model's lower bound for the component's forward pass (None if not modelled)."""
    B, T, D, H = (REFERENCE[k] for k in ("batch", "tokens", "d_model", "heads"))
    F, C = REFERENCE["ffn"], REFERENCE["classes"]
    model = {
        "linear": lambda: cost_model.linear(B * T, D, 3 * D, parties),
        "attention_matmul": lambda: cost_model.matmul(T, D // H, T, parties, batch=B * H),
        "masked_softmax": lambda: cost_model.masked_softmax(B * H * T, T, parties),
        "layer_norm": lambda: cost_model.layer_norm(B * T, D, parties),
        "gelu": lambda: cost_model.gelu(B * T * F, parties),
        "masked_mean": lambda: cost_model.masked_mean(B, T, D, parties),
        "cross_entropy": lambda: cost_model.cross_entropy(B, C, parties),
    }
    try:
        cost = model[component]()
    except (AttributeError, TypeError):  # not (yet) in the cost model
        return None
    return {"bytes": cost.bytes, "rounds": cost.rounds, "bytes0": cost.bytes0,
            "rounds0": cost.rounds0}  # fmt: skip


@pytest.mark.parametrize("parties", [2, 3])
def test_components(benchmark, parties):
    step = measure(head_build, head_run, REFERENCE | {"mode": "train"}, parties=parties,
                   repeats=pick(1, 3))  # fmt: skip
    step_seconds = sorted(step.mpc["step"].seconds)[len(step.mpc["step"].seconds) // 2]
    step_bytes = step.bytes_per_party("step")[0]

    def run_all():
        return {c: measure(component_build, component_run, REFERENCE | {"component": c},
                           parties=parties, repeats=pick(1, 3)) for c in COMPONENTS}  # fmt: skip

    results = benchmark.pedantic(run_all, rounds=1, iterations=1)
    for component, result in results.items():
        n = occurrences(component, REFERENCE["blocks"])
        both = [f + b for f, b in zip(result.mpc["forward"].seconds,
                                      result.mpc["backward"].seconds, strict=True)]  # fmt: skip
        sent = result.bytes_per_party("forward")[0] + result.bytes_per_party("backward")[0]
        share = {"seconds": n * sorted(both)[len(both) // 2] / step_seconds,
                 "bytes": n * sent / step_bytes, "occurrences": n}  # fmt: skip
        for phase in ("forward", "backward"):
            write_phase_row(
                f"component/mpc{parties}/{component}/{phase}",
                result,
                phase,
                group="component",
                config=REFERENCE | {"component": component},
                parties=parties,
                component=component,
                share_of_step=share,
                bound=_bound(component, parties) if phase == "forward" else None,
            )
