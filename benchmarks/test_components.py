"""Each component of the reference step alone, forward and backward, MPC vs plaintext.

    make bench   (or: .venv/bin/pytest benchmarks/test_components.py)

Shapes are those the component has inside the reference step (benchmarks/workloads.py),
including the MPC-native head's replacements (quad_attention, quad_activation, center). Each
row also carries the component's share of its head's reference step: its time (and bytes,
rounds) times the number of times it runs in a step, over the step's, measured in the same
run (the native parts against the native step, the others against the exact step).
"""

from __future__ import annotations

import pytest

from benchmarks.measure import measure_each, pick, write_phase_row
from benchmarks.workloads import (
    COMPONENTS,
    NATIVE_REPLACES,
    REFERENCE,
    component_build,
    component_run,
    head_build,
    head_run,
    occurrences,
)
from mpc_ft import cost_model


def _bound(component: str, parties: int) -> dict | None:
    """The cost model's count for the component's forward pass (exact for CrypTen's protocol:
    tests/test_cost_model.py; None if not modelled)."""
    B, T, D, H = (REFERENCE[k] for k in ("batch", "tokens", "d_model", "heads"))
    F, C = REFERENCE["ffn"], REFERENCE["classes"]
    model = {
        "linear": lambda: cost_model.linear(B * T, D, 3 * D, parties, ndim=3),
        "attention_matmul": lambda: cost_model.matmul(T, D // H, T, parties, batch=B * H, ndim=4),
        "masked_softmax": lambda: cost_model.masked_softmax(B * H * T, T, parties, mask_rows=B,
                                                            ndim=4),
        "layer_norm": lambda: cost_model.layer_norm(B * T, D, parties, ndim=3),
        "gelu": lambda: cost_model.gelu(B * T * F, parties, ndim=3),
        "masked_mean": lambda: cost_model.masked_mean(B, T, D, parties),  # inv_count given
        "cross_entropy": lambda: cost_model.cross_entropy_backward(B, C, parties),
        "quad_attention": lambda: cost_model.quad_attention(B, H, T, parties),
        "quad_activation": lambda: cost_model.quad_activation(B * T * F, parties, ndim=3),
        "center": lambda: cost_model.center(B * T, D, parties, ndim=3),
    }  # fmt: skip
    try:
        cost = model[component]()
    except (AttributeError, TypeError):  # not (yet) in the cost model
        return None
    return {"bytes": cost.bytes, "rounds": cost.rounds, "bytes0": cost.bytes0,
            "rounds0": cost.rounds0}  # fmt: skip


@pytest.mark.parametrize("parties", [2, 3])
def test_components(benchmark, parties):
    steps = measure_each(
        {native: (head_build, head_run, REFERENCE | {"mode": "train", "native": native})
         for native in (False, True)},
        parties=parties, repeats=pick(1, 3),
    )  # fmt: skip

    def run_all():
        return measure_each({c: (component_build, component_run, REFERENCE | {"component": c})
                             for c in COMPONENTS}, parties=parties, repeats=pick(1, 3))  # fmt: skip

    results = benchmark.pedantic(run_all, rounds=1, iterations=1)
    for component, result in results.items():
        n = occurrences(component, REFERENCE["blocks"])
        step = steps[component in NATIVE_REPLACES]  # the native head's parts: of its step
        step_seconds = sorted(step.mpc["step"].seconds)[len(step.mpc["step"].seconds) // 2]
        step_bytes = step.bytes_per_party("step")[0]
        step_rounds = step.rounds_per_party("step")[0]
        both = [f + b for f, b in zip(result.mpc["forward"].seconds,
                                      result.mpc["backward"].seconds, strict=True)]  # fmt: skip
        sent = result.bytes_per_party("forward")[0] + result.bytes_per_party("backward")[0]
        rounds = result.rounds_per_party("forward")[0] + result.rounds_per_party("backward")[0]
        share = {"seconds": n * sorted(both)[len(both) // 2] / step_seconds,
                 "bytes": n * sent / step_bytes, "rounds": n * rounds / step_rounds,
                 "occurrences": n}  # fmt: skip
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
