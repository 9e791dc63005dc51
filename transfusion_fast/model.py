"""The thin Transfusion model: one transformer over packed text tokens and continuous spans.

Reads top to bottom like gpt-fast's model.py: the config, the small modules, the model. All compute
goes through :mod:`transfusion_fast.ops`, so the backend switch governs every kernel.

Public API (stable)::

    config = ModelConfig(vocab_size=260, bos_id=256, eos_id=257, boi_id=258, eoi_id=259, pad_id=0,
                         dim=64, depth=2, n_heads=4, n_kv_heads=2,
                         modalities=(ModalityConfig("image", "image", channels=1, patch_size=2,
                                                    max_size=8),))
    model = Model(config)
    batch = pack(samples, config, seed=0)       # samples: [[LongTensor, (C,H,W) image, ...], ...]
    out = model(batch)                          # {"loss", "lm_loss", "diffusion_loss",
                                                #  "diffusion_loss/<modality>", "lm_tokens", "spans"}
    out["loss"].backward()
    gens = model.generate(prompts, max_new_tokens=32, seed=0)   # list (per prompt) of items:
                                                # text LongTensors (with BOI/EOI/EOS ids) and spans
    # generate kwargs: temperature, top_k, top_p, seed, sampler ("ddim"|"ddpm"),
    # num_inference_steps=250, cfg_scale=5.0, eta, span_shape, modality, progress, stop_at_eos.
    # A prompt ending in BOI forces a span; a prompt holding an image is captioned.
    save_checkpoint(path, model, optimizer=opt, step=10)
    model, info = load_checkpoint(path)         # or load_checkpoint(path, model, opt) to resume

* ``ModelConfig.to_dict()`` / ``ModelConfig.from_dict(d)``: JSON-safe round trip (used by checkpoints).
* ``Batch`` (from :mod:`transfusion_fast.pack`): ``tokens``, ``positions``, ``axial``, ``layout``,
  ``targets`` (-100 = no loss), ``spans`` (per modality: ``SpanData`` with ``rows``, ``x0``, ``x_t``,
  ``noise``, ``timesteps``, ``span_index``), ``span_shapes``, ``num_spans``; ``batch.to(device)``.
* ``pack(..., seed, device, cfg_drop_prob, caption_noise_prob=0.8, caption_max_timestep=500,
  timesteps=None)``: one document per sample (BOS … EOS, BOI/EOI around each span).
* ``Model.from_hf(path_or_model, freeze_text=False, special_tokens=None, tokenizer=None, **overrides)``:
  the backbone of a local Hugging Face LLaMA-family checkpoint (:mod:`transfusion_fast.hf_weights`)
  with fresh modality heads; ``Model.text_logits(ids)``: next-token logits of text-only input.
* ``Model.embed`` / ``Model.forward_hidden`` / ``Model.decode_spans``: the pieces the generator
  reuses with a KV cache.
* Distributed: wrap in DDP, or ``fully_shard`` each of ``model.layers`` then the model (FSDP2).
  Modality heads absent from a rank's batch join its loss with weight 0, so every rank uses
  every parameter.

Shapes: ``T`` packed tokens, ``N`` span rows (patches) of one modality, ``P`` = patch dimension.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import hf_weights, ops
from .layout import Layout
from .ops.attention import SUPPORTED_HEAD_DIMS
from .schedules import SCHEDULES, get_schedule

__all__ = ["ModalityConfig", "ModelConfig", "Model", "Block", "Attention", "FeedForward",
           "ModalityHead", "TimestepEmbedder", "IGNORE_INDEX"]

#: target id of rows without a next-token loss (F.cross_entropy's default ignore_index)
IGNORE_INDEX = -100
PREDICTIONS = ("eps", "v", "x0")
CONDITIONINGS = ("patch_add", "adaln_zero")
SPAN_POSITIONS = ("sequential", "axial")
MODALITY_KINDS = ("image", "sequence")


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ModalityConfig:
    """One continuous modality.

    * ``kind="image"``: items are ``(channels, H, W)`` tensors, ``H`` and ``W`` multiples of
      ``patch_size`` and at most ``max_size``; one row per ``patch_size × patch_size`` patch.
    * ``kind="sequence"`` (time series): items are ``(L, channels)`` tensors (frames × features),
      ``L`` a multiple of ``patch_size`` and at most ``max_size``; one row per ``patch_size`` frames.

    ``boi_id``/``eoi_id`` default to the model's shared BOI/EOI tokens.
    """

    name: str
    kind: str = "image"
    channels: int = 3
    patch_size: int = 2
    max_size: int = 32
    boi_id: int | None = None
    eoi_id: int | None = None

    @property
    def patch_dim(self) -> int:
        p = self.patch_size
        return p * p * self.channels if self.kind == "image" else p * self.channels

    @property
    def default_shape(self) -> tuple:
        """Shape of a generated item when none is asked for: the largest allowed."""
        if self.kind == "image":
            return (self.channels, self.max_size, self.max_size)
        return (self.max_size, self.channels)

    def num_patches(self, shape) -> int:
        if self.kind == "image":
            return (shape[-2] // self.patch_size) * (shape[-1] // self.patch_size)
        return shape[0] // self.patch_size


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network and its training objective (saved in checkpoints)."""

    vocab_size: int = 260
    bos_id: int = 256
    eos_id: int = 257
    boi_id: int = 258
    eoi_id: int = 259
    pad_id: int = 0
    dim: int = 64
    depth: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None      # None: n_heads (no GQA)
    head_dim: int | None = None        # None: dim // n_heads
    ffn_multiple_of: int = 32          # SwiGLU hidden = 8/3·dim rounded up to this multiple
    ffn_hidden_size: int | None = None  # exact SwiGLU hidden size (HF intermediate_size); None: derived
    qkv_bias: bool = False             # biases on the q/k/v projection (Qwen2)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    span_positions: str = "sequential"  # "axial": image patches get 2-D (row, column) RoPE
    modalities: tuple = (ModalityConfig("image"),)
    diffusion_steps: int = 1000
    schedule: str = "cosine"
    prediction: str = "eps"
    diffusion_loss_weight: float = 5.0  # λ in loss = LM + λ·diffusion
    conditioning: str = "patch_add"    # or "adaln_zero" (DiT)
    cfg_drop_prob: float = 0.1         # pack drops the text before a sample's first span this often
    max_seq_len: int = 2048
    time_freq_dim: int = 256           # sinusoidal features of the timestep embedding

    def __post_init__(self):
        mods = tuple(ModalityConfig(**m) if isinstance(m, dict) else m for m in self.modalities)
        object.__setattr__(self, "modalities", mods)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, the expected and the received value."""
        def positive_int(name):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                     f"ModelConfig.{name} must be a positive int, got {v!r}")
        for name in ("vocab_size", "dim", "depth", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_multiple_of", "diffusion_steps", "max_seq_len", "time_freq_dim"):
            positive_int(name)
        if self.ffn_hidden_size is not None:
            positive_int("ffn_hidden_size")
        _require(isinstance(self.qkv_bias, bool), f"ModelConfig.qkv_bias must be a bool, got {self.qkv_bias!r}")
        _require(self.n_heads % self.n_kv_heads == 0,
                 f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                 f"({self.n_kv_heads}) for grouped-query attention")
        _require(self.head_dim in SUPPORTED_HEAD_DIMS,
                 f"ModelConfig.head_dim must be one of {SUPPORTED_HEAD_DIMS} (the attention kernels'), "
                 f"got {self.head_dim}")
        _require(self.time_freq_dim % 2 == 0,
                 f"ModelConfig.time_freq_dim must be even, got {self.time_freq_dim}")
        specials = {"bos_id": self.bos_id, "eos_id": self.eos_id, "boi_id": self.boi_id,
                    "eoi_id": self.eoi_id, "pad_id": self.pad_id}
        for m in self.modalities:
            if isinstance(m, ModalityConfig):
                for attr in ("boi_id", "eoi_id"):
                    if getattr(m, attr) is not None:
                        specials[f"modalities[{m.name}].{attr}"] = getattr(m, attr)
        for name, v in specials.items():
            _require(isinstance(v, int) and 0 <= v < self.vocab_size,
                     f"ModelConfig.{name} must be a token id in [0, vocab_size={self.vocab_size}), got {v!r}")
        core = (self.bos_id, self.eos_id, self.boi_id, self.eoi_id)
        _require(len(set(core)) == 4, f"ModelConfig special tokens bos_id/eos_id/boi_id/eoi_id must be "
                 f"distinct ids, got {core}")
        bois = {m.boi_id if m.boi_id is not None else self.boi_id for m in self.modalities
                if isinstance(m, ModalityConfig)}
        eois = {m.eoi_id if m.eoi_id is not None else self.eoi_id for m in self.modalities
                if isinstance(m, ModalityConfig)}
        _require(not (bois & eois) and not ((bois | eois) & {self.bos_id, self.eos_id}),
                 f"modality BOI ids {sorted(bois)} and EOI ids {sorted(eois)} must differ from each other "
                 f"and from bos_id={self.bos_id} / eos_id={self.eos_id}")
        _require(self.norm_eps > 0, f"ModelConfig.norm_eps must be positive, got {self.norm_eps!r}")
        _require(self.rope_theta > 0, f"ModelConfig.rope_theta must be positive, got {self.rope_theta!r}")
        _require(self.span_positions in SPAN_POSITIONS,
                 f"ModelConfig.span_positions must be one of {SPAN_POSITIONS}, got {self.span_positions!r}")
        if self.span_positions == "axial":
            _require(self.head_dim % 4 == 0, f"ModelConfig.span_positions='axial' needs head_dim "
                     f"divisible by 4, got {self.head_dim}")
        _require(self.schedule in SCHEDULES,
                 f"ModelConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(self.prediction in PREDICTIONS,
                 f"ModelConfig.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        _require(self.conditioning in CONDITIONINGS,
                 f"ModelConfig.conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        _require(isinstance(self.diffusion_loss_weight, (int, float)) and self.diffusion_loss_weight >= 0,
                 f"ModelConfig.diffusion_loss_weight must be a float >= 0, got {self.diffusion_loss_weight!r}")
        _require(isinstance(self.cfg_drop_prob, (int, float)) and 0 <= self.cfg_drop_prob <= 1,
                 f"ModelConfig.cfg_drop_prob must lie in [0, 1], got {self.cfg_drop_prob!r}")
        names = set()
        for m in self.modalities:
            _require(isinstance(m, ModalityConfig),
                     f"ModelConfig.modalities must hold ModalityConfig (or dicts), got {type(m).__name__}")
            _require(isinstance(m.name, str) and m.name and "/" not in m.name and m.name not in names,
                     f"modality names must be distinct non-empty strings without '/', got {m.name!r}")
            names.add(m.name)
            _require(m.kind in MODALITY_KINDS,
                     f"modality {m.name!r}: kind must be one of {MODALITY_KINDS}, got {m.kind!r}")
            for attr in ("channels", "patch_size", "max_size"):
                v = getattr(m, attr)
                _require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                         f"modality {m.name!r}: {attr} must be a positive int, got {v!r}")
            _require(m.max_size % m.patch_size == 0,
                     f"modality {m.name!r}: max_size ({m.max_size}) must be a multiple of patch_size "
                     f"({m.patch_size})")

    # ------------------------------------------------------------------ derived
    @property
    def ffn_hidden(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return _find_multiple(int(2 * 4 * self.dim / 3), self.ffn_multiple_of)

    def modality(self, name: str) -> ModalityConfig:
        for m in self.modalities:
            if m.name == name:
                return m
        raise ValueError(f"unknown modality {name!r}; the config has {[m.name for m in self.modalities]}")

    def boi_of(self, m: ModalityConfig) -> int:
        return self.boi_id if m.boi_id is None else m.boi_id

    def eoi_of(self, m: ModalityConfig) -> int:
        return self.eoi_id if m.eoi_id is None else m.eoi_id

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["modalities"] = [dataclasses.asdict(m) for m in self.modalities]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown fields {unknown}; expected a subset of {sorted(known)}")
        d = dict(d)
        if "modalities" in d:
            d["modalities"] = tuple(ModalityConfig(**m) if isinstance(m, dict) else m for m in d["modalities"])
        return cls(**d)


# ------------------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``, or with ``residual`` the fused ``(norm(x + residual), x + residual)``."""
        return ops.rms_norm(x, self.weight, self.eps, residual=residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.theta = config.rope_theta
        qkv = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, axial: torch.Tensor | None,
                layout: Layout, kv_cache=None) -> torch.Tensor:
        T = x.shape[0]
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
        q, k = ops.apply_rope(q, k, positions, self.theta, axial=axial)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)                  # (Tk, Hkv, D): past + new keys
        o = ops.attention(q, k, v, layout)                            # (T, H, D)
        return self.wo(o.reshape(T, H * D))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.ffn_hidden, bias=False)   # [gate | up]
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(ops.swiglu_fused(self.w13(x)))


class Block(nn.Module):
    """Pre-norm LLaMA block; with ``adaln_zero`` span rows are modulated by their timestep (DiT).

    ``modulation`` is ``(T, 6·dim)`` (shift, scale, gate for attention and MLP) already zero on
    text rows, and ``text_rows`` is ``(T, 1)`` 1.0 on text rows so that text sees gate 1: the
    block is plain LLaMA on text and adaLN-Zero on spans.
    """

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attention = Attention(config, layer)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.adaln = None
        if config.conditioning == "adaln_zero":
            self.adaln = nn.Linear(config.dim, 6 * config.dim)
            nn.init.zeros_(self.adaln.weight)
            nn.init.zeros_(self.adaln.bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, axial: torch.Tensor | None,
                layout: Layout, cond: torch.Tensor | None = None, span_rows: torch.Tensor | None = None,
                kv_cache=None) -> torch.Tensor:
        # x (T, dim); cond (T, dim) timestep embedding (zero on text rows); span_rows (T, 1) float
        if self.adaln is None:
            a = self.attention(self.attention_norm(x), positions, axial, layout, kv_cache)
            h, x = self.ffn_norm(a, residual=x)                       # x ← x + a; h = norm(x)
            return x + self.feed_forward(h)
        mod = self.adaln(F.silu(cond)) * span_rows                    # (T, 6·dim), zero on text
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        text_rows = 1.0 - span_rows
        h = self.attention_norm(x) * (1 + scale_a) + shift_a
        a = (gate_a + text_rows) * self.attention(h, positions, axial, layout, kv_cache)
        h, x = self.ffn_norm(a, residual=x)
        h = h * (1 + scale_m) + shift_m
        return x + (gate_m + text_rows) * self.feed_forward(h)


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of integer timesteps ``(N,)`` → ``(N, dim)`` float32 (DiT/ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class ModalityHead(nn.Module):
    """Linear patch encoder/decoder of one modality (the paper's linear variant).

    ``patch_add``: the timestep embedding (in patch space) is added to every patch before the
    projection. ``adaln_zero``: the embedding (in model space) conditions the blocks instead.
    """

    def __init__(self, config: ModelConfig, modality: ModalityConfig):
        super().__init__()
        self.modality = modality
        self.patch_add = config.conditioning == "patch_add"
        P = modality.patch_dim
        self.time = TimestepEmbedder(P if self.patch_add else config.dim, config.time_freq_dim)
        self.encoder = nn.Linear(P, config.dim)
        self.decoder = nn.Linear(config.dim, P)
        if not self.patch_add:   # DiT zero-initializes the output layer
            nn.init.zeros_(self.decoder.weight)
            nn.init.zeros_(self.decoder.bias)

    def encode(self, x_t: torch.Tensor, t: torch.Tensor):
        """x_t (N, P), t (N,) → embeddings (N, dim) and the block conditioning (N, dim) or None."""
        if self.patch_add:
            return self.encoder(x_t + self.time(t)), None
        return self.encoder(x_t), self.time(t)


# ------------------------------------------------------------------------------------- model
class Model(nn.Module):
    """Transfusion: causal LM over text, bidirectional diffusion over every continuous span."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.depth))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.heads = nn.ModuleDict({m.name: ModalityHead(config, m) for m in config.modalities})
        self.final_adaln = None
        if config.conditioning == "adaln_zero":
            self.final_adaln = nn.Linear(config.dim, 2 * config.dim)
            nn.init.zeros_(self.final_adaln.weight)
            nn.init.zeros_(self.final_adaln.bias)
        self.schedule = get_schedule(config.schedule, config.diffusion_steps)

    # ------------------------------------------------------------------ backbone
    def embed(self, tokens: torch.Tensor, spans: dict):
        """Token embeddings with span rows replaced by their patch encodings.

        tokens (T,); spans: name → (rows (N,), x_t (N, P), t (N,)).
        Returns h (T, dim), cond (T, dim) or None, span_rows (T, 1) float or None.
        """
        h = self.tok_embeddings(tokens)                                # (T, dim)
        adaln = self.final_adaln is not None
        cond = torch.zeros_like(h) if adaln else None
        is_span = torch.zeros(tokens.shape[0], 1, dtype=h.dtype, device=h.device) if adaln else None
        for name, (rows, x_t, t) in spans.items():
            enc, c = self.heads[name].encode(x_t.to(h.dtype), t)     # (N, dim)
            h = h.index_copy(0, rows, enc)
            if adaln:
                cond = cond.index_copy(0, rows, c)
                is_span = is_span.index_fill(0, rows, 1.0)
        return h, cond, is_span

    def forward_hidden(self, h: torch.Tensor, positions: torch.Tensor, axial: torch.Tensor | None,
                       layout: Layout, cond: torch.Tensor | None = None,
                       span_rows: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """The blocks and the final norm: h (T, dim) → (T, dim). ``kv_cache`` for generation."""
        for block in self.layers:
            h = block(h, positions, axial, layout, cond, span_rows, kv_cache)
        h = self.norm(h)
        if self.final_adaln is not None:
            shift, scale = (self.final_adaln(F.silu(cond)) * span_rows).chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        return h

    def decode_spans(self, h: torch.Tensor, name: str, rows: torch.Tensor) -> torch.Tensor:
        """The diffusion prediction (ε, v or x0 per config) of span rows: (N, P)."""
        return self.heads[name].decoder(h[rows])

    # ------------------------------------------------------------------ training
    def forward(self, batch) -> dict:
        """Losses of a packed :class:`~transfusion_fast.pack.Batch`.

        Returns ``loss`` = ``lm_loss`` + λ·``diffusion_loss``, where ``lm_loss`` is the mean
        next-token cross-entropy over rows with a target and ``diffusion_loss`` the mean over spans
        of each span's MSE against the configured target; ``diffusion_loss/<modality>`` per
        modality present in the batch; ``lm_tokens`` and ``spans`` counts.
        """
        spans_in = {name: (s.rows, s.x_t, s.timesteps) for name, s in batch.spans.items()}
        h, cond, span_rows = self.embed(batch.tokens, spans_in)
        h = self.forward_hidden(h, batch.positions, batch.axial, batch.layout, cond, span_rows)

        loss_rows = batch.loss_rows                                    # (M,) rows with a target
        if loss_rows.numel():
            logits = self.output(h[loss_rows]).float()                 # (M, vocab)
            lm_loss = F.cross_entropy(logits, batch.targets[loss_rows])
        else:
            lm_loss = self.output(h[:1]).float().sum() * 0.0

        out = {}
        span_sq = h.new_zeros(batch.num_spans, dtype=torch.float32)    # per-span mean squared error
        for name, s in batch.spans.items():
            pred = self.decode_spans(h, name, s.rows).float()          # (N, P)
            target = ops.diffusion_target(s.x0.float(), s.noise.float(), s.timesteps, self.schedule,
                                          self.config.prediction)
            per_patch = (pred - target).pow(2).mean(-1)                # (N,)
            weight = 1.0 / batch.span_sizes[s.span_index]             # (N,): each span sums to 1
            span_sq = span_sq.index_add(0, s.span_index, per_patch * weight)
            out[f"diffusion_loss/{name}"] = (per_patch * weight).sum() / weight.sum()
        diffusion_loss = span_sq.mean() if batch.num_spans else h.new_zeros((), dtype=torch.float32)
        # Heads of modalities absent from the batch join with weight 0: DDP and FSDP then see
        # every parameter used on every rank, whatever each rank's batch holds.
        absent = [p for name, head in self.heads.items() if name not in batch.spans for p in head.parameters()]
        unused = sum(p.sum() for p in absent) * 0.0 if absent else 0.0
        out.update(loss=lm_loss + self.config.diffusion_loss_weight * diffusion_loss + unused,
                   lm_loss=lm_loss, diffusion_loss=diffusion_loss,
                   lm_tokens=int(loss_rows.numel()), spans=int(batch.num_spans))
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, **kwargs):
        """Mixed-modal generation; see :func:`transfusion_fast.generate.generate`."""
        from .generate import generate
        return generate(self, prompts, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, source, *, freeze_text: bool = False, special_tokens: dict | None = None,
                tokenizer=None, **config_overrides) -> "Model":
        """A Transfusion model whose backbone is a Hugging Face LLaMA-family checkpoint.

        ``source``: a local checkpoint directory (``config.json`` + ``*.safetensors``) or an
        in-memory model (``.config``, ``.state_dict()``); see :mod:`transfusion_fast.hf_weights` for
        the mapping and the special tokens (``special_tokens``, ``tokenizer``). ``config_overrides``
        set the Transfusion fields (``modalities``, ``prediction``, ``conditioning``, ...; a smaller
        ``max_seq_len``); the backbone's fields come from the checkpoint. The modality heads (and
        adaLN layers) are freshly initialized; with ``freeze_text=True`` they are the only
        parameters left trainable: every weight read from the checkpoint, the embedding and output
        rows of appended special tokens included, gets ``requires_grad=False``.
        """
        conv = hf_weights.convert_hf(source, special_tokens=special_tokens, tokenizer=tokenizer)
        fixed = sorted(set(config_overrides) & (set(conv.config) - {"max_seq_len"}))
        _require(not fixed, f"from_hf: {fixed} come from the checkpoint and cannot be overridden "
                 f"(checkpoint values {[conv.config[k] for k in fixed]}); use special_tokens= for special ids")
        limit = conv.config["max_seq_len"]
        max_seq_len = config_overrides.get("max_seq_len", limit)
        _require(isinstance(max_seq_len, int) and 0 < max_seq_len <= limit,
                 f"from_hf: max_seq_len must be a positive int <= {limit} (the checkpoint's "
                 f"max_position_embeddings / sliding_window), got {max_seq_len!r}")
        model = cls(ModelConfig(**{**conv.config, **config_overrides}))
        missing, unexpected = model.load_state_dict(conv.state_dict, strict=False)
        new = {name for name, _ in model.named_parameters()} - set(conv.state_dict)
        _require(not unexpected and set(missing) <= new, f"from_hf: weights do not fit the model: "
                 f"missing {sorted(set(missing) - new)}, unexpected {sorted(unexpected)}")
        if freeze_text:
            for name, p in model.named_parameters():
                p.requires_grad_(name in new)
        return model

    def text_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (float32) of text-only input, each row one causal document from
        position 0: ids ``(T,)`` → ``(T, vocab)``, ``(B, T)`` → ``(B, T, vocab)``."""
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64) \
                or ids.dim() not in (1, 2) or ids.numel() == 0:
            got = (ids.dtype, tuple(ids.shape)) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must be a non-empty int32/int64 tensor of shape (T,) or (B, T), got {got}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"ids must lie in [0, vocab_size={self.config.vocab_size}), got values in "
                             f"[{lo}, {hi}]")
        rows = ids.reshape(-1, ids.shape[-1])
        batch, length = rows.shape
        cu = torch.arange(0, (batch + 1) * length, length, device=ids.device, dtype=torch.int32)
        layout = Layout.causal(cu)
        h, cond, span_rows = self.embed(rows.reshape(-1).long(), {})
        h = self.forward_hidden(h, layout.positions, None, layout, cond, span_rows)
        return self.output(h).float().view(*ids.shape, -1)
