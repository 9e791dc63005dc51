"""The thin Transfusion model: one transformer over packed text tokens and continuous spans.

Reads top to bottom like gpt-fast's model.py: the small modules, then the model (the config lives in
:mod:`transfusion_fast.config`; ``ModelConfig`` and ``ModalityConfig`` are re-exported here). All
compute goes through :mod:`transfusion_fast.ops`, so the backend switch governs every kernel.

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
    # generate kwargs: temperature, top_k, top_p, seed, sampler ("ddim"|"ddpm"; "euler"|"heun" for
    # objective="flow"), num_inference_steps=250, cfg_scale=5.0, eta, span_shape, modality, progress,
    # stop_at_eos, codecs (default model.codecs).
    # A prompt ending in BOI forces a span; a prompt holding an image is captioned.
    save_checkpoint(path, model, optimizer=opt, step=10)
    model, info = load_checkpoint(path)         # or load_checkpoint(path, model, opt) to resume

* ``ModelConfig.to_dict()`` / ``ModelConfig.from_dict(d)``: JSON-safe round trip (used by checkpoints).
* ``Batch`` (from :mod:`transfusion_fast.pack`): ``tokens``, ``positions``, ``axial``, ``layout``,
  ``targets`` (-100 = no loss), ``spans`` (per modality: ``SpanData`` with ``rows``, ``x0``, ``x_t``,
  ``noise``, ``timesteps``, ``span_index``, ``shapes``), ``span_shapes``, ``num_spans``; ``batch.to(device)``.
* ``pack(..., seed, device, cfg_drop_prob, caption_noise_prob=0.8, caption_max_timestep=500,
  timesteps=None, codecs=None)``: one document per sample (BOS … EOS, BOI/EOI around each span).
* Latent modalities: ``Model(config, codecs={"image": LatentCodec.from_diffusers(vae)})`` or
  ``model.attach_codec("image", codec)``; the codec is held outside the parameters (never saved).
* ``Model.from_hf(path_or_model, freeze_text=False, special_tokens=None, tokenizer=None, **overrides)``:
  the backbone of a local Hugging Face LLaMA-family checkpoint (:mod:`transfusion_fast.hf_weights`)
  with fresh modality heads; ``Model.text_logits(ids)``: next-token logits of text-only input.
* ``Model.embed`` / ``Model.forward_hidden`` / ``Model.decode_spans``: the pieces the generator
  reuses with a KV cache.
* Mixed precision: run ``model(batch)`` under ``torch.autocast`` (bf16, or fp16 with a GradScaler)
  with fp32 parameters; the residual stream, norms' statistics, modality heads and losses stay fp32.
  ``ModelConfig.activation_checkpointing``: per-block recomputation in the backward.
  ``torch.compile(model, fullgraph=True)`` traces the whole training forward (docs/training_at_scale.md).
* Distributed: wrap in DDP, or ``fully_shard`` each of ``model.layers`` then the model (FSDP2).
  Modality heads absent from a rank's batch join its loss with weight 0, so every rank uses
  every parameter.

Shapes: ``T`` packed tokens, ``N`` span rows (patches) of one modality, ``P`` = patch dimension.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import hf_weights, ops
from .codec import check_codecs
from .config import IGNORE_INDEX, UNET_GROUPS, ModalityConfig, ModelConfig
from .encoders import UNetPatchCoder
from .generate import generate
from .layout import Layout
from .pack import check_batch_config
from .schedules import get_schedule

__all__ = ["ModalityConfig", "ModelConfig", "Model", "Block", "Attention", "FeedForward",
           "ModalityHead", "TimestepEmbedder", "IGNORE_INDEX"]


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


def full_precision(like: torch.Tensor):
    """Autocast switched off for the block: the modality heads (timestep embedding, patch encoder
    and decoder) run in the parameters' dtype. They hold a negligible share of the FLOPs, and
    they carry what the diffusion loss is most sensitive to: the noised patches in, the predicted
    noise out, and the timestep features (``docs/training_at_scale.md``)."""
    return torch.autocast(like.device.type, enabled=False)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class ModalityHead(nn.Module):
    """Patch encoder/decoder of one modality: linear (the paper's linear variant) or U-Net.

    Linear (``encoder="linear"``): ``patch_add`` adds the timestep embedding (in patch space) to
    every patch before the projection; ``adaln_zero`` feeds the embedding (in model space) to the
    blocks instead. U-Net (``encoder="unet"``, :class:`~transfusion_fast.encoders.UNetPatchCoder`):
    the embedding (in model space) conditions every residual block of the down and up blocks, and
    under ``adaln_zero`` the transformer blocks too. Its decoder needs the skip features of the
    encoding of the same rows: :meth:`encode` returns them as a state that :meth:`decode` takes.

    Times: DDPM's integer steps as they are; a flow model's ``t`` in [0, 1] is scaled by
    ``diffusion_steps`` first, so the sinusoidal features span the same range.
    """

    def __init__(self, config: ModelConfig, modality: ModalityConfig):
        super().__init__()
        self.modality = modality
        self.patch_add = config.conditioning == "patch_add"
        self.time_scale = float(config.diffusion_steps) if config.is_flow else None
        P = modality.patch_dim
        self.coder = None
        if modality.encoder == "unet":
            self.time = TimestepEmbedder(config.dim, config.time_freq_dim)
            self.coder = UNetPatchCoder.for_modality(modality, config.dim, config.dim,
                                                     base_channels=modality.unet_channels,
                                                     num_res_blocks=modality.unet_res_blocks, groups=UNET_GROUPS)
            return
        self.time = TimestepEmbedder(P if self.patch_add else config.dim, config.time_freq_dim)
        self.encoder = nn.Linear(P, config.dim)
        self.decoder = nn.Linear(config.dim, P)
        if not self.patch_add:   # DiT zero-initializes the output layer
            nn.init.zeros_(self.decoder.weight)
            nn.init.zeros_(self.decoder.bias)

    def _embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time(t.float() * self.time_scale if self.time_scale is not None else t)

    def encode(self, x_t: torch.Tensor, t: torch.Tensor, shapes=None):
        """x_t (N, P), t (N,) → embeddings (N, dim), the block conditioning (N, dim) or None, and
        the U-Net state (None for the linear encoder), in the parameters' dtype (outside autocast:
        see :func:`full_precision`). ``shapes``: the item shape of each span whose rows ``x_t``
        holds, span after span (the U-Net needs them; Python values, not tensors)."""
        with full_precision(x_t):
            if self.coder is None:
                x_t = x_t.to(self.encoder.weight.dtype)
                if self.patch_add:
                    return self.encoder(x_t + self._embed_time(t)), None, None
                return self.encoder(x_t), self._embed_time(t), None
            if not shapes:
                raise ValueError(f"modality {self.modality.name!r} (encoder='unet') needs the shapes of its "
                                 f"spans to encode them, got {shapes!r}")
            sizes = [(int(shape[-2]), int(shape[-1])) for shape in shapes]
            first, offset = [], 0
            for size in sizes:
                first.append(offset)
                offset += self.modality.num_patches(size)
            first_rows = torch.tensor(first, dtype=torch.long, device=t.device)
            x_t = x_t.to(self.time.mlp[0].weight.dtype)
            tokens, state = self.coder.encode(x_t, self._embed_time(t[first_rows]), sizes)
            return tokens, (None if self.patch_add else self._embed_time(t)), state

    def decode(self, h: torch.Tensor, state=None) -> torch.Tensor:
        """The transformer's outputs on the span rows ``(N, dim)`` → the prediction ``(N, P)``, in
        the parameters' dtype (outside autocast); ``state``: what :meth:`encode` returned for the
        same rows (U-Net only)."""
        with full_precision(h):
            if self.coder is None:
                return self.decoder(h.to(self.decoder.weight.dtype))
            if state is None:
                raise ValueError(f"modality {self.modality.name!r} (encoder='unet') decodes with the state its "
                                 f"encode returned (the skip features), got state=None")
            return self.coder.decode(h.to(self.time.mlp[0].weight.dtype), state)


# ------------------------------------------------------------------------------------- model
class Model(nn.Module):
    """Transfusion: causal LM over text, bidirectional diffusion over every continuous span."""

    def __init__(self, config: ModelConfig, *, codecs: dict | None = None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        # A plain dict, not submodules: the frozen autoencoders stay out of parameters() and
        # state_dict(), hence out of the optimizer, the EMA and checkpoints.
        self.codecs = check_codecs(codecs, config.modalities)
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

    # ------------------------------------------------------------------ codecs
    def attach_codec(self, name: str, codec) -> None:
        """Make modality ``name`` a latent modality of ``codec`` (a :class:`~transfusion_fast.LatentCodec`):
        :meth:`generate` decodes its spans, and the trainer passes ``model.codecs`` to
        :func:`~transfusion_fast.pack`. The codec is not saved in checkpoints: attach it again after
        loading one. ``codec=None`` detaches."""
        codecs = dict(self.codecs)
        codecs.pop(name, None)
        if codec is not None:
            codecs[name] = codec
        self.codecs = check_codecs(codecs, self.config.modalities)

    # ------------------------------------------------------------------ backbone
    def embed(self, tokens: torch.Tensor, spans: dict, states: dict | None = None):
        """Token embeddings with span rows replaced by their patch encodings.

        tokens (T,); spans: name → (rows (N,), x_t (N, P), t (N,)) or (rows, x_t, t, shapes) with
        ``shapes`` the item shape of each of the modality's spans in row order (needed by a U-Net
        encoder). ``states``: a dict that receives name → the U-Net state of each U-Net modality,
        for :meth:`decode_spans`.
        Returns h (T, dim), cond (T, dim) or None, span_rows (T, 1) float or None.
        """
        h = self.tok_embeddings(tokens)                                # (T, dim)
        adaln = self.final_adaln is not None
        cond = torch.zeros_like(h) if adaln else None
        is_span = torch.zeros(tokens.shape[0], 1, dtype=h.dtype, device=h.device) if adaln else None
        for name, (rows, x_t, t, *shapes) in spans.items():
            enc, c, state = self.heads[name].encode(x_t, t, shapes[0] if shapes else None)   # (N, dim)
            if states is not None and state is not None:
                states[name] = state
            h = h.index_copy(0, rows, enc.to(h.dtype))
            if adaln:
                cond = cond.index_copy(0, rows, c.to(h.dtype))
                is_span = is_span.index_fill(0, rows, 1.0)
        return h, cond, is_span

    def forward_hidden(self, h: torch.Tensor, positions: torch.Tensor, axial: torch.Tensor | None,
                       layout: Layout, cond: torch.Tensor | None = None,
                       span_rows: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """The blocks and the final norm: h (T, dim) → (T, dim). ``kv_cache`` for generation.

        With ``config.activation_checkpointing`` (in training mode, with grad enabled) each block
        keeps only its input for the backward and recomputes its activations there.
        """
        checkpointing = (self.config.activation_checkpointing and self.training and kv_cache is None
                         and torch.is_grad_enabled())
        for block in self.layers:
            if checkpointing:
                h = checkpoint(block, h, positions, axial, layout, cond, span_rows, use_reentrant=False)
            else:
                h = block(h, positions, axial, layout, cond, span_rows, kv_cache)
        h = self.norm(h)
        if self.final_adaln is not None:
            shift, scale = (self.final_adaln(F.silu(cond)) * span_rows).chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        return h

    def decode_spans(self, h: torch.Tensor, name: str, rows: torch.Tensor, state=None) -> torch.Tensor:
        """The prediction of span rows ``(N, P)``: ε, v or x0 per ``config.prediction`` (DDPM), the
        velocity ε − x0 (flow). ``state``: the U-Net state :meth:`embed` gave for these rows."""
        return self.heads[name].decode(h[rows], state)

    # ------------------------------------------------------------------ training
    def forward(self, batch) -> dict:
        """Losses of a packed :class:`~transfusion_fast.pack.Batch`.

        Returns ``loss`` = ``lm_loss`` + λ·``diffusion_loss``, where ``lm_loss`` is the mean
        next-token cross-entropy over rows with a target and ``diffusion_loss`` the mean over spans
        of each span's MSE against the configured target (DDPM: ε, v or x0; flow: the velocity
        ε − x0); ``diffusion_loss/<modality>`` per modality present in the batch; ``lm_tokens`` and
        ``spans`` counts.
        """
        check_batch_config(batch, self.config)
        # Span shapes are Python ints: only a U-Net encoder reads them, and handing them to the
        # linear one too would make torch.compile guard on (and recompile for) each image size.
        spans_in = {name: (s.rows, s.x_t, s.timesteps) + ((s.shapes,) if self.heads[name].coder is not None else ())
                    for name, s in batch.spans.items()}
        states: dict = {}
        h, cond, span_rows = self.embed(batch.tokens, spans_in, states)
        h = self.forward_hidden(h, batch.positions, batch.axial, batch.layout, cond, span_rows)

        loss_rows = batch.loss_rows                                    # (M,) rows with a target
        if loss_rows.numel():
            # The LM head and its cross-entropy fused, chunk by chunk of rows: the (M, vocab)
            # logits never exist (ops.linear_cross_entropy; under autocast its matmuls run in the
            # autocast dtype, the softmax and the loss in fp32).
            lm_loss = ops.linear_cross_entropy(h[loss_rows], self.output.weight, batch.targets[loss_rows],
                                               ignore_index=IGNORE_INDEX)
        else:
            lm_loss = self.output(h[:1]).float().sum() * 0.0

        out = {}
        span_sq = h.new_zeros(batch.num_spans, dtype=torch.float32)    # per-span mean squared error
        for name, s in batch.spans.items():
            pred = self.decode_spans(h, name, s.rows, states.get(name)).float()   # (N, P)
            if self.config.is_flow:
                target = ops.flow_target(s.x0.float(), s.noise.float())
            else:
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
        if fixed:
            raise ValueError(f"from_hf: {fixed} come from the checkpoint and cannot be overridden "
                             f"(checkpoint values {[conv.config[k] for k in fixed]}); use special_tokens= for special ids")
        limit = conv.config["max_seq_len"]
        max_seq_len = config_overrides.get("max_seq_len", limit)
        if not (isinstance(max_seq_len, int) and 0 < max_seq_len <= limit):
            raise ValueError(f"from_hf: max_seq_len must be a positive int <= {limit} (the checkpoint's "
                             f"max_position_embeddings / sliding_window), got {max_seq_len!r}")
        model = cls(ModelConfig(**{**conv.config, **config_overrides}))
        missing, unexpected = model.load_state_dict(conv.state_dict, strict=False)
        new = {name for name, _ in model.named_parameters()} - set(conv.state_dict)
        if unexpected or not set(missing) <= new:
            raise ValueError(f"from_hf: weights do not fit the model: "
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
