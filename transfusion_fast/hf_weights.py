"""Hugging Face LLaMA-family checkpoints → the weights and config of :class:`transfusion_fast.Model`.

Reads a local checkpoint directory (``config.json`` and ``*.safetensors``, sharded or not, read
with ``safetensors``; ``tokenizer.json`` when present) or takes an in-memory model (anything with a
``.config`` and a ``.state_dict()``, e.g. a ``transformers`` ``LlamaForCausalLM``). Needs no
``transformers``. :func:`convert_hf` validates everything it can map and returns the
``ModelConfig`` keyword arguments and a state dict under the Model's parameter names;
``Model.from_hf`` builds the model from them.

The mapping (``L`` = ``model.layers.{i}``)::

    model.embed_tokens.weight                  → tok_embeddings.weight (special rows appended)
    L.self_attn.{q,k,v}_proj.{weight,bias}     → layers.{i}.attention.wqkv.{weight,bias}  rows [q | k | v]
    L.self_attn.o_proj.weight                  → layers.{i}.attention.wo.weight
    L.mlp.{gate,up}_proj.weight                → layers.{i}.feed_forward.w13.weight       rows [gate | up]
    L.mlp.down_proj.weight                     → layers.{i}.feed_forward.w2.weight
    L.input_layernorm.weight                   → layers.{i}.attention_norm.weight
    L.post_attention_layernorm.weight          → layers.{i}.ffn_norm.weight
    model.norm.weight                          → norm.weight
    lm_head.weight (embed_tokens if tied)      → output.weight

No row permutation is needed: transformers' LLaMA rotates half-split pairs ``(i, i + D/2)``, the
convention :func:`transfusion_fast.ops.apply_rope` (and the Model) uses by default. Tied embeddings
are copied into ``output.weight``: the converted model starts with the same logits and unties them
when fine-tuned.

Special tokens: ``bos``/``eos`` come from the HF config; ``boi``/``eoi`` (and any special given as a
token string) are looked up in the tokenizer, and those the tokenizer lacks are appended after the
checkpoint's vocabulary, their embedding and output rows initialized to the mean of the existing
rows plus a small deterministic perturbation (so that BOI and EOI differ from each other).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from .ops.attention import SUPPORTED_HEAD_DIMS

__all__ = ["HFConversion", "SUPPORTED_MODEL_TYPES", "DEFAULT_SPECIAL_TOKENS", "convert_hf", "read_hf_config",
           "read_hf_state_dict", "hf_config_to_kwargs"]

#: ``model_type`` values this module maps (same block: pre-norm RMSNorm, rotate-half RoPE, SwiGLU)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: token strings looked up in the tokenizer for the specials the HF config does not define
DEFAULT_SPECIAL_TOKENS = {"boi": "<boi>", "eoi": "<eoi>"}
SPECIAL_NAMES = ("bos", "eos", "boi", "eoi", "pad")

# Relative size of the perturbation added to the mean row when appending a special token.
_NEW_ROW_NOISE = 0.1


@dataclass
class HFConversion:
    """What :func:`convert_hf` returns."""

    config: dict                    # ModelConfig keyword arguments of the backbone and special ids
    state_dict: dict                # Model parameter name → tensor (backbone, embeddings, output)
    model_type: str                 # the HF config's model_type
    text_vocab_size: int            # rows of the checkpoint's embedding
    added_tokens: dict = field(default_factory=dict)   # special name → id appended to the vocabulary


def _fail(message: str):
    raise ValueError(f"from_hf: {message}")


# --------------------------------------------------------------------------------- reading
def _is_directory_source(source) -> bool:
    return isinstance(source, (str, os.PathLike))


def read_hf_config(source) -> dict:
    """The HF config of ``source`` as a plain dict (``config.json``, or ``model.config``)."""
    if _is_directory_source(source):
        path = os.path.join(os.fspath(source), "config.json")
        if not os.path.isdir(os.fspath(source)):
            raise FileNotFoundError(f"from_hf: {os.fspath(source)!r} is not a directory holding a Hugging Face "
                                    f"checkpoint (config.json + *.safetensors)")
        if not os.path.exists(path):
            raise FileNotFoundError(f"from_hf: {path!r} does not exist: the checkpoint directory needs its "
                                    f"config.json")
        with open(path) as f:
            return json.load(f)
    config = getattr(source, "config", None)
    if config is None or not callable(getattr(source, "state_dict", None)):
        raise TypeError(f"from_hf: source must be a local checkpoint directory or a model with .config and "
                        f".state_dict(), got {type(source).__name__}")
    if isinstance(config, dict):
        return dict(config)
    if not callable(getattr(config, "to_dict", None)):
        raise TypeError(f"from_hf: source.config must be a dict or have .to_dict(), got {type(config).__name__}")
    return config.to_dict()


def read_hf_state_dict(source) -> dict:
    """All tensors of ``source``: every ``*.safetensors`` file of the directory (the shards named by
    ``model.safetensors.index.json`` when it exists), or ``source.state_dict()``."""
    if not _is_directory_source(source):
        return dict(source.state_dict())
    directory = os.fspath(source)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        others = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth")))
        _fail(f"no *.safetensors weights in {directory!r}" + (
            f" (found {others}: re-save with save_pretrained(..., safe_serialization=True))" if others else ""))
    state = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            _fail(f"shard {name!r} named by model.safetensors.index.json is missing from {directory!r}")
        state.update(load_file(path))
    return state


def _tokenizer_vocab(source, tokenizer) -> dict | None:
    """token string → id, from ``tokenizer`` (``get_vocab()``) or the directory's tokenizer.json."""
    if tokenizer is not None:
        if not callable(getattr(tokenizer, "get_vocab", None)):
            raise TypeError(f"from_hf: tokenizer must have get_vocab() (a transformers tokenizer), got "
                            f"{type(tokenizer).__name__}")
        return dict(tokenizer.get_vocab())
    if not _is_directory_source(source):
        return None
    path = os.path.join(os.fspath(source), "tokenizer.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    vocab = {}
    model_vocab = (data.get("model") or {}).get("vocab")
    if isinstance(model_vocab, dict):
        vocab.update(model_vocab)
    for token in data.get("added_tokens") or ():
        vocab[token["content"]] = int(token["id"])
    return vocab


# --------------------------------------------------------------------------------- config
def _first_id(value):
    """HF token ids may be an int, a list of ints (several EOS) or None."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _rope(hf: dict) -> float:
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        _fail(f"per-layer-type rope_parameters {sorted(params)} are not supported (one RoPE for every layer)")
    params = dict(params or {})
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        _fail(f"rope scaling {rope_type!r} is not supported (only plain RoPE, rope_type 'default'); got "
              f"rope parameters {params}")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or not theta > 0:
        _fail(f"rope_theta must be a positive number, got {theta!r}")
    factor = hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        _fail(f"partial_rotary_factor={factor} is not supported (RoPE over the whole head_dim only)")
    return float(theta)


def hf_config_to_kwargs(hf: dict) -> dict:
    """ModelConfig keyword arguments of the backbone described by HF config ``hf`` (no special ids).

    Raises ``ValueError`` naming the field for anything the Model cannot reproduce exactly.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        _fail(f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES} "
              f"(LLaMA-family decoders without extra norms or fused projections)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        _fail(f"hidden_act must be 'silu' (SwiGLU), got {act!r}")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            _fail(f"{name}=True is not supported (the Model has no output-projection or MLP biases)")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    for name in required:
        v = hf.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            _fail(f"config field {name} must be a positive int, got {v!r}")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim not in SUPPORTED_HEAD_DIMS:
        _fail(f"head_dim {head_dim} is not one the attention kernels support {SUPPORTED_HEAD_DIMS}")
    if heads % kv_heads:
        _fail(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    max_seq_len = int(hf.get("max_position_embeddings") or 2048)
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types") or ()
    if model_type == "qwen2":
        if hf.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            _fail(f"Qwen2 sliding-window layers are not supported (use_sliding_window="
                  f"{hf.get('use_sliding_window')!r}, layer_types={list(layer_types)})")
    elif window is not None:
        # Mistral: a window no shorter than every document has no effect, so cap the document length.
        if not isinstance(window, int) or window <= 0:
            _fail(f"sliding_window must be a positive int or None, got {window!r}")
        max_seq_len = min(max_seq_len, window)
    eps = hf.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or not eps > 0:
        _fail(f"rms_norm_eps must be a positive number, got {eps!r}")
    return dict(dim=hf["hidden_size"], depth=hf["num_hidden_layers"], n_heads=heads, n_kv_heads=kv_heads,
                head_dim=head_dim, ffn_hidden_size=hf["intermediate_size"], norm_eps=float(eps),
                rope_theta=_rope(hf), max_seq_len=max_seq_len)


# --------------------------------------------------------------------------------- weights
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def _strip_prefix(state: dict) -> tuple[dict, dict]:
    """Split ``state`` into the decoder's tensors (``model.`` prefix removed) and the others."""
    if any(k.startswith("model.") for k in state):
        body = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        rest = {k: v for k, v in state.items() if not k.startswith("model.")}
        return body, rest
    rest = {k: v for k, v in state.items() if k == "lm_head.weight"}
    return {k: v for k, v in state.items() if k != "lm_head.weight"}, rest


def _take(body: dict, key: str, shape: tuple, dtype) -> torch.Tensor:
    if key not in body:
        _fail(f"the checkpoint has no tensor {key!r}")
    t = body.pop(key)
    if tuple(t.shape) != shape:
        _fail(f"tensor {key!r} has shape {tuple(t.shape)}, expected {shape} from the config")
    return t.detach().to(dtype)


def _map_weights(state: dict, kw: dict, hf: dict, dtype) -> tuple[dict, bool]:
    body, rest = _strip_prefix(state)
    body = {k: v for k, v in body.items() if not k.endswith("rotary_emb.inv_freq")}
    dim, heads, kv, hd, ffn = kw["dim"], kw["n_heads"], kw["n_kv_heads"], kw["head_dim"], kw["ffn_hidden_size"]
    vocab = hf["vocab_size"]
    out = {"tok_embeddings.weight": _take(body, "embed_tokens.weight", (vocab, dim), dtype),
           "norm.weight": _take(body, "norm.weight", (dim,), dtype)}
    qkv_bias = any(k.endswith("self_attn.q_proj.bias") for k in body)
    for i in range(kw["depth"]):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        q = _take(body, a + "q_proj.weight", (heads * hd, dim), dtype)
        k = _take(body, a + "k_proj.weight", (kv * hd, dim), dtype)
        v = _take(body, a + "v_proj.weight", (kv * hd, dim), dtype)
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, v], dim=0)
        if qkv_bias:
            out[f"layers.{i}.attention.wqkv.bias"] = torch.cat(
                [_take(body, a + "q_proj.bias", (heads * hd,), dtype),
                 _take(body, a + "k_proj.bias", (kv * hd,), dtype),
                 _take(body, a + "v_proj.bias", (kv * hd,), dtype)])
        out[f"layers.{i}.attention.wo.weight"] = _take(body, a + "o_proj.weight", (dim, heads * hd), dtype)
        gate = _take(body, m + "gate_proj.weight", (ffn, dim), dtype)
        up = _take(body, m + "up_proj.weight", (ffn, dim), dtype)
        out[f"layers.{i}.feed_forward.w13.weight"] = torch.cat([gate, up], dim=0)
        out[f"layers.{i}.feed_forward.w2.weight"] = _take(body, m + "down_proj.weight", (dim, ffn), dtype)
        out[f"layers.{i}.attention_norm.weight"] = _take(body, f"layers.{i}.input_layernorm.weight", (dim,), dtype)
        out[f"layers.{i}.ffn_norm.weight"] = _take(body, f"layers.{i}.post_attention_layernorm.weight", (dim,),
                                                   dtype)
    if body:
        extra = sorted(body)
        deeper = sorted({int(mt.group(1)) for k in extra if (mt := _LAYER_KEY.match(k))})
        _fail(f"the checkpoint holds tensors this mapping does not know: {extra[:8]}"
              + (f" (layers {deeper} beyond num_hidden_layers={kw['depth']}?)" if deeper and
                 deeper[0] >= kw["depth"] else "") + " - not a plain LLaMA-family block")

    tied = bool(hf.get("tie_word_embeddings", False))
    head = rest.pop("lm_head.weight", None)
    if rest:
        _fail(f"the checkpoint holds tensors this mapping does not know: {sorted(rest)[:8]}")
    if tied:
        if head is not None and not torch.equal(head.detach().to(dtype), out["tok_embeddings.weight"]):
            _fail("tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight "
                  "(tied/untied mismatch)")
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    else:
        if head is None:
            _fail("tie_word_embeddings=False but the checkpoint has no lm_head.weight (tied/untied mismatch)")
        if tuple(head.shape) != (vocab, dim):
            _fail(f"tensor 'lm_head.weight' has shape {tuple(head.shape)}, expected {(vocab, dim)}")
        out["output.weight"] = head.detach().to(dtype)
    return out, qkv_bias


def _mean_rows(weight: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    w = weight.float()
    mean, std = w.mean(0), w.std(0) if w.shape[0] > 1 else torch.zeros_like(w[0])
    noise = torch.randn(n, w.shape[1], generator=generator)
    return (mean + _NEW_ROW_NOISE * std * noise).to(weight.dtype)


# --------------------------------------------------------------------------------- specials
def _resolve_specials(hf: dict, vocab: dict | None, special_tokens: dict | None, hf_vocab_size: int):
    """(name → id for every special, names to append in order)."""
    requested = dict(DEFAULT_SPECIAL_TOKENS)
    if special_tokens is not None:
        if not isinstance(special_tokens, dict):
            raise TypeError(f"from_hf: special_tokens must be a dict name → id or token string, got "
                            f"{type(special_tokens).__name__}")
        unknown = sorted(set(special_tokens) - set(SPECIAL_NAMES))
        if unknown:
            _fail(f"special_tokens has unknown names {unknown}; expected a subset of {SPECIAL_NAMES}")
        requested.update(special_tokens)
    ids, append = {}, []
    for name in SPECIAL_NAMES:
        value = requested.get(name)
        if value is None and name in ("bos", "eos", "pad"):
            value = _first_id(hf.get(f"{name}_token_id"))
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < hf_vocab_size:
                _fail(f"special token {name} id {value} lies outside the checkpoint's vocabulary "
                      f"[0, {hf_vocab_size})")
            ids[name] = value
        elif isinstance(value, str):
            if vocab is not None and value in vocab and 0 <= vocab[value] < hf_vocab_size:
                ids[name] = int(vocab[value])
            elif name != "pad":
                append.append(name)
        elif value is not None:
            raise TypeError(f"from_hf: special_tokens[{name!r}] must be an int id or a token string, got "
                            f"{type(value).__name__}")
        elif name != "pad":
            append.append(name)
    for k, name in enumerate(append):
        ids[name] = hf_vocab_size + k
    if "pad" not in ids:          # PAD only fills span rows, whose embeddings are replaced: any id works
        ids["pad"] = ids["eos"]
    core = [ids[n] for n in ("bos", "eos", "boi", "eoi")]
    if len(set(core)) != 4:
        named = dict(zip(("bos", "eos", "boi", "eoi"), core))
        _fail(f"special tokens bos/eos/boi/eoi must be distinct ids, got {named}")
    return ids, append


# --------------------------------------------------------------------------------- entry point
def convert_hf(source, *, special_tokens: dict | None = None, tokenizer=None,
               dtype: torch.dtype = torch.float32) -> HFConversion:
    """Read and map an HF LLaMA-family checkpoint; see the module docstring.

    Args:
        source: a local checkpoint directory or an in-memory model (``.config``, ``.state_dict()``).
        special_tokens: optional ``{"bos"|"eos"|"boi"|"eoi"|"pad": id or token string}``; defaults:
            bos/eos/pad from the HF config, boi/eoi looked up as ``"<boi>"``/``"<eoi>"``.
        tokenizer: a tokenizer (``get_vocab()``) to look token strings up in; default the
            directory's ``tokenizer.json``.
        dtype: dtype of the returned weights (the Model trains in float32).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"from_hf: dtype must be a floating torch.dtype, got {dtype!r}")
    hf = read_hf_config(source)
    kw = hf_config_to_kwargs(hf)
    hf_vocab_size = hf["vocab_size"]
    ids, append = _resolve_specials(hf, _tokenizer_vocab(source, tokenizer), special_tokens, hf_vocab_size)
    state, qkv_bias = _map_weights(read_hf_state_dict(source), kw, hf, dtype)
    if append:
        g = torch.Generator().manual_seed(0)
        for name in ("tok_embeddings.weight", "output.weight"):
            state[name] = torch.cat([state[name], _mean_rows(state[name], len(append), g)])
    kw.update(vocab_size=hf_vocab_size + len(append), qkv_bias=qkv_bias,
              **{f"{n}_id": ids[n] for n in SPECIAL_NAMES})
    return HFConversion(config=kw, state_dict=state, model_type=hf["model_type"],
                        text_vocab_size=hf_vocab_size, added_tokens={n: ids[n] for n in append})
