"""The task head: one definition, run by the plaintext twin (TorchOps) and under CrypTen (MpcOps).

    features [B,T,d_in] --projection--> [B,T,D] --N post-LN encoder blocks--> [B,T,D]
      --masked mean pool--> [B,D] --classifier--> logits [B,C]

Each block: fused QKV projection, multi-head self-attention with the padding mask applied to the
keys, output projection, residual, LayerNorm, FFN (GELU, tanh form), residual, LayerNorm.
The last LayerNorm's gain and shift are applied after the pooling, to [B,D] instead of [B,T,D]:
the same function, since the pooling weights of a row sum to 1 (under MPC a product by the gain
at a 32nd of the size, forward and backward).

Parameters live in a flat dict name -> tensor (plain or shared), so the same forward function serves
both backends and the model owner can share or receive them one by one. `HeadModule` wraps saved
weights as an ordinary `torch.nn.Module` that needs no CrypTen.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from mpc_ft.config import HeadConfig
from mpc_ft.ops import TorchOps


def param_shapes(head: HeadConfig, d_input: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in a fixed order (the order they are shared in)."""
    d, f = head.d_model, head.d_ffn
    shapes: dict[str, tuple[int, ...]] = {}
    if head.project_input:
        shapes |= {"in.w": (d_input, d), "in.b": (d,)}
    elif d_input != d:
        raise ValueError(f"project_input is off but the input width {d_input} != d_model {d}")
    for i in range(head.num_blocks):
        shapes |= {
            f"b{i}.qkv.w": (d, 3 * d),
            f"b{i}.qkv.b": (3 * d,),
            f"b{i}.out.w": (d, d),
            f"b{i}.out.b": (d,),
            f"b{i}.ln1.g": (d,),
            f"b{i}.ln1.b": (d,),
            f"b{i}.ffn1.w": (d, f),
            f"b{i}.ffn1.b": (f,),
            f"b{i}.ffn2.w": (f, d),
            f"b{i}.ffn2.b": (d,),
            f"b{i}.ln2.g": (d,),
            f"b{i}.ln2.b": (d,),
        }
    shapes |= {"cls.w": (d, num_classes), "cls.b": (num_classes,)}
    return shapes


def init_params(
    head: HeadConfig, d_input: int, num_classes: int, seed: int
) -> dict[str, torch.Tensor]:
    """Seeded initial weights: uniform(+-1/sqrt(fan_in)) like torch.nn.Linear, zero biases,
    LayerNorm gain 1 and shift 0."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in param_shapes(head, d_input, num_classes).items():
        if name.endswith(".g"):
            params[name] = torch.ones(shape)
        elif len(shape) == 1:
            params[name] = torch.zeros(shape)
        else:
            bound = 1.0 / math.sqrt(shape[0])
            params[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return params


def forward(
    params: dict[str, Any],
    x: Any,
    mask: Any,
    head: HeadConfig,
    ops: Any = TorchOps,
    inv_count: Any = None,
) -> Any:
    """x [B,T,d_in], mask [B,T] (1 real token, 0 padding), inv_count [B,1] (1 / real tokens,
    or None to compute it) -> logits [B,C]."""
    B, T = x.size(0), x.size(1)
    D, H = head.d_model, head.num_heads
    hs = D // H
    key_mask = mask.reshape(B, 1, 1, T)  # broadcast over heads and queries
    norm = ops.layer_norm if head.norm == "layernorm" else ops.center
    bare_norm = ops.normalize if head.norm == "layernorm" else ops.centred  # no gain, no shift
    activation = ops.gelu if head.activation == "gelu" else ops.quad_activation
    if inv_count is None:  # 1 / real tokens per row; data owners share it with their data
        inv_count = ops.inverse_count(mask)
    h = ops.linear(x, params["in.w"], params["in.b"]) if head.project_input else x  # [B,T,D]
    for i in range(head.num_blocks):
        p = f"b{i}."
        qkv = ops.linear(h, params[p + "qkv.w"], params[p + "qkv.b"])  # [B,T,3D]

        def heads(part: int, qkv: Any = qkv) -> Any:  # [B,T,3D] -> [B,H,T,hs]
            return qkv.narrow(2, part * D, D).reshape(B, T, H, hs).permute((0, 2, 1, 3))

        q = heads(0) * (1.0 / math.sqrt(hs))  # scale q: fewer elements than the scores
        scores = q.matmul(heads(1).transpose(2, 3))  # [B,H,T,T]
        if head.attention == "softmax":
            weights = ops.masked_softmax(scores, key_mask)
        else:
            weights = ops.quad_attention(scores, key_mask, inv_count)
        attn = weights.matmul(heads(2))  # [B,H,T,hs]
        attn = attn.permute((0, 2, 1, 3)).reshape(B, T, D)
        h = norm(
            h + ops.linear(attn, params[p + "out.w"], params[p + "out.b"]),
            params[p + "ln1.g"],
            params[p + "ln1.b"],
            head.ln_eps,
        )
        ffn = ops.linear(activation(ops.linear(h, params[p + "ffn1.w"], params[p + "ffn1.b"])),
                         params[p + "ffn2.w"], params[p + "ffn2.b"])  # fmt: skip
        if i < head.num_blocks - 1:
            h = norm(h + ffn, params[p + "ln2.g"], params[p + "ln2.b"], head.ln_eps)
        else:  # the last: its gain and shift after the pooling (module docstring)
            h = bare_norm(h + ffn, head.ln_eps)
    pooled = ops.masked_mean(h, mask, inv_count)  # [B,D]
    if head.num_blocks:
        last = f"b{head.num_blocks - 1}."
        pooled = ops.affine(pooled, params[last + "ln2.g"], params[last + "ln2.b"])
    return ops.linear(pooled, params["cls.w"], params["cls.b"])  # [B,C]


class HeadModule(torch.nn.Module):
    """A trained head as a plain torch module: `HeadModule.load(dir)(features, mask)`."""

    def __init__(self, head: HeadConfig, params: dict[str, torch.Tensor], labels: list[str]):
        super().__init__()
        self.head = head
        self.labels = list(labels)
        self.params = torch.nn.ParameterDict(
            {k.replace(".", "_"): torch.nn.Parameter(v) for k, v in params.items()}
        )
        self._names = list(params)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        params = {n: self.params[n.replace(".", "_")] for n in self._names}
        return forward(params, features, mask, self.head)

    def save(self, out_dir: str | Path) -> Path:
        """Write head.safetensors and head.json (architecture, labels) into out_dir."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {n: self.params[n.replace(".", "_")].detach().contiguous() for n in self._names}
        tmp = out / ".head.safetensors.tmp"
        save_file(tensors, str(tmp))
        meta = {"head": vars(self.head), "labels": self.labels, "order": self._names}
        (out / ".head.json.tmp").write_text(json.dumps(meta, indent=2))
        tmp.replace(out / "head.safetensors")
        (out / ".head.json.tmp").replace(out / "head.json")
        return out / "head.safetensors"

    @classmethod
    def load(cls, out_dir: str | Path) -> HeadModule:
        from safetensors.torch import load_file

        out = Path(out_dir)
        meta = json.loads((out / "head.json").read_text())
        tensors = load_file(str(out / "head.safetensors"))
        params = {n: tensors[n] for n in meta["order"]}
        return cls(HeadConfig(**meta["head"]), params, meta["labels"])
