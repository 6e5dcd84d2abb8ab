"""The benchmark workloads (see measure.py for the build/run contract).

`head_*`: a training step (or an inference forward) of the head on synthetic features, at the
reference shapes of shared/DESIGN.md unless scaled: one post-LN block of width 128 on width-128
inputs (no projection), batch 16, 32 tokens (rows 0-7 padded in their last 8 positions), 2 heads,
FFN 256, 2 classes, plain SGD lr 0.1.

`component_*`: one building block of that step alone, forward then backward, at the shapes it
has inside the reference step (cross_entropy: the step's gradient computation, all in "forward").
"""

from __future__ import annotations

from typing import Any

import torch

from mpc_ft import head as head_def
from mpc_ft import train
from mpc_ft.config import NATIVE_HEAD, HeadConfig, TrainConfig

REFERENCE = {"batch": 16, "tokens": 32, "d_model": 128, "heads": 2, "ffn": 256, "blocks": 1,
             "classes": 2}  # fmt: skip


NATIVE = NATIVE_HEAD  # the MPC-native head (README, "Exact and MPC-native heads")


def _head(d_model: int, heads: int, ffn: int, blocks: int, native: bool = False) -> HeadConfig:
    return HeadConfig(d_model=d_model, num_heads=heads, d_ffn=ffn, num_blocks=blocks,
                      project_input=False, **(NATIVE if native else {}))  # fmt: skip


def _data(batch: int, tokens: int, width: int, classes: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, width, generator=g)
    mask = torch.ones(batch, tokens)
    mask[: batch // 2, tokens - tokens // 4 :] = 0  # half the rows padded in their last quarter
    labels = torch.randint(0, classes, (batch,), generator=g)
    y = torch.nn.functional.one_hot(labels, classes).float()
    return {"x": x, "mask": mask, "y": y, "inv_count": 1.0 / mask.sum(1, keepdim=True)}


def head_build(*, batch: int, tokens: int, d_model: int, heads: int, ffn: int, blocks: int,
               classes: int, native: bool = False,
               **_: Any) -> dict[str, torch.Tensor]:  # fmt: skip
    head = _head(d_model, heads, ffn, blocks, native)
    params = head_def.init_params(head, d_model, classes, seed=0)
    return _data(batch, tokens, d_model, classes) | {f"p.{k}": v for k, v in params.items()}


def head_run(inputs: dict[str, Any], ops: Any, timer: Any, *, d_model: int, heads: int,
             ffn: int, blocks: int, mode: str = "train", lr: float = 0.1,
             native: bool = False, triples_ahead: bool = False, **_: Any) -> None:  # fmt: skip
    """mode "train": phases forward, backward, update and their sum "step"; with triples_ahead
    also "offline" before it: the step's triples in one dealer request (offline.py; the first,
    warm-up run records the requests). mode "inference": one forward without gradients,
    phase "inference"."""
    head = _head(d_model, heads, ffn, blocks, native)
    x, mask, y, counts = inputs["x"], inputs["mask"], inputs["y"], inputs["inv_count"]
    if mode == "inference":
        params = {k[2:]: v for k, v in inputs.items() if k.startswith("p.")}
        with ops.no_grad(), timer("inference"):
            head_def.forward(params, x, mask, head, ops, counts)
        return
    params = {k[2:]: ops.leaf(v) for k, v in inputs.items() if k.startswith("p.")}
    sgd = TrainConfig(lr=lr, momentum=0.0, weight_decay=0.0)
    triples = getattr(ops, "triples", None) if triples_ahead else None
    if triples_ahead:
        with timer("offline"):
            if triples is not None:
                triples.begin()
    with timer("step"):  # train.train_step, phase by phase
        with timer("forward"):
            logits = head_def.forward(params, x, mask, head, ops, counts)
        with timer("backward"):
            ops.cross_entropy_backward(logits, y)
        with timer("update"):
            train.sgd_step(params, {}, sgd, ops, rows=x.size(0))
    if triples is not None:
        triples.end()


# --- components, at their shapes inside the step ---------------------------------------------

COMPONENTS = ("linear", "attention_matmul", "masked_softmax", "layer_norm", "gelu",
              "masked_mean", "cross_entropy", "quad_attention", "quad_activation",
              "center")  # fmt: skip
NATIVE_REPLACES = {"quad_attention": "masked_softmax", "quad_activation": "gelu",
                   "center": "layer_norm"}  # fmt: skip


# How often each component runs in one step of `blocks` blocks (forward; backward alike).
def occurrences(component: str, blocks: int) -> int:
    return {"linear": 4 * blocks + 1, "attention_matmul": 2 * blocks, "masked_softmax": blocks,
            "layer_norm": 2 * blocks, "gelu": blocks, "masked_mean": 1,
            "cross_entropy": 1}[NATIVE_REPLACES.get(component, component)]  # fmt: skip


def component_shapes(component: str, *, batch: int, tokens: int, d_model: int, heads: int,
                     ffn: int, classes: int, **_: Any) -> dict[str, tuple[int, ...]]:  # fmt: skip
    B, T, D, H = batch, tokens, d_model, heads
    return {
        "linear": {"x": (B, T, D), "w": (D, 3 * D), "b": (3 * D,), "g": (B, T, 3 * D)},
        "attention_matmul": {"a": (B, H, T, D // H), "b": (B, H, D // H, T), "g": (B, H, T, T)},
        "masked_softmax": {"x": (B, H, T, T), "g": (B, H, T, T)},
        "quad_attention": {"x": (B, H, T, T), "g": (B, H, T, T)},
        "layer_norm": {"x": (B, T, D), "w": (D,), "b": (D,), "g": (B, T, D)},
        "center": {"x": (B, T, D), "w": (D,), "b": (D,), "g": (B, T, D)},
        "gelu": {"x": (B, T, ffn), "g": (B, T, ffn)},
        "quad_activation": {"x": (B, T, ffn), "g": (B, T, ffn)},
        "masked_mean": {"x": (B, T, D), "g": (B, D)},
        "cross_entropy": {"x": (B, classes)},
    }[component]


def component_build(*, component: str, **config: Any) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = component_shapes(component, **config)
    inputs = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    data = _data(config["batch"], config["tokens"], 1, config["classes"])
    inputs["mask"], inputs["y"], inputs["inv_count"] = data["mask"], data["y"], data["inv_count"]
    if component in ("layer_norm", "center"):
        inputs["w"] = 1 + 0.1 * inputs["w"]
    return inputs


def component_run(inputs: dict[str, Any], ops: Any, timer: Any, *, component: str,
                  **config: Any) -> None:  # fmt: skip
    x = ops.leaf(inputs.get("x", inputs.get("a")))
    mask = inputs["mask"]
    B, T = mask.size(0), mask.size(1)
    with timer("forward"):
        if component == "linear":
            out = ops.linear(x, ops.leaf(inputs["w"]), ops.leaf(inputs["b"]))
        elif component == "attention_matmul":
            out = x.matmul(ops.leaf(inputs["b"]))
        elif component == "masked_softmax":
            out = ops.masked_softmax(x, mask.reshape(B, 1, 1, T))
        elif component == "quad_attention":
            out = ops.quad_attention(x, mask.reshape(B, 1, 1, T), inputs["inv_count"])
        elif component == "quad_activation":
            out = ops.quad_activation(x)
        elif component == "center":
            out = ops.center(x, ops.leaf(inputs["w"]), ops.leaf(inputs["b"]), 1e-5)
        elif component == "layer_norm":
            out = ops.layer_norm(x, ops.leaf(inputs["w"]), ops.leaf(inputs["b"]), 1e-5)
        elif component == "gelu":
            out = ops.gelu(x)
        elif component == "masked_mean":
            out = ops.masked_mean(x, mask, inputs["inv_count"])
        elif component == "cross_entropy":  # the step's: the loss gradient, no loss (train.py)
            out = ops.cross_entropy_backward(x, inputs["y"])
        else:
            raise ValueError(f"unknown component {component!r}")
    with timer("backward"):
        if component != "cross_entropy":
            out.backward(inputs["g"])


# --- Rotten Tomatoes features, cached (benchmarks/.cache), for the accuracy-type cases ---------


def rotten_tomatoes(train_size: int, test_size: int | None
                    ) -> tuple[train.Dataset, train.Dataset, tuple[str, ...]]:  # fmt: skip
    """The demo's split by movie; a stratified sample of each part (test_size None: the whole
    held-out pool); the default backbone's layer-4 features, 32 tokens. Returns train, test and
    the label names."""
    from pathlib import Path

    from mpc_ft import backbone
    from mpc_ft import data as data_lib

    full = data_lib.load_rotten_tomatoes()
    pool, held_out = data_lib.split_by_group(full, test_fraction=0.2, seed=0)
    texts = {"train": data_lib.stratified_sample(pool, train_size, 0),
             "test": held_out if test_size is None
             else data_lib.stratified_sample(held_out, test_size, 0)}  # fmt: skip
    labels = data_lib.label_names(texts["train"])
    out = []
    for part in ("train", "test"):
        x, mask = backbone.extract_features(
            texts[part].texts, backbone=backbone.default_backbone_path(), layer=4,
            max_tokens=32, cache_dir=Path(__file__).parent / ".cache", progress=False,
        )  # fmt: skip
        y = data_lib.one_hot(data_lib.encode_labels(texts[part], labels), len(labels))
        out.append(train.Dataset.counted(x, mask, y))
    return out[0], out[1], labels
