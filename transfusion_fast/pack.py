"""Packing mixed-modal samples into one batch: no padding, one Layout, noised spans, loss targets.

A sample is a list of items in order: 1-D integer tensors of text token ids, images ``(C, H, W)``
and time series ``(L, F)`` (or ``(modality_name, tensor)`` to pick a modality explicitly). Each
sample becomes one document ``BOS text… BOI patches… EOI text… EOS``; every span is bidirectional,
noised at its own timestep, and the documents are concatenated (``cu_seqlens``) under one
:class:`~transfusion_fast.Layout`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from . import ops
from .checks import MAX_SEED, check_bool, check_float, check_int, check_int_list
from .layout import Layout
from .config import IGNORE_INDEX, ModalityConfig, ModelConfig
from .schedules import get_schedule

__all__ = ["Batch", "SpanData", "pack", "prepare_sample", "check_span", "to_patches", "from_patches",
           "span_positions", "PreparedSample", "PACKED_FIELDS", "check_batch_config"]


@dataclass
class SpanData:
    """The span rows of one modality in a packed batch (``N`` patches of dimension ``P``)."""

    rows: torch.Tensor        # (N,) long: row of each patch in the packed sequence
    x0: torch.Tensor          # (N, P) clean patches
    x_t: torch.Tensor         # (N, P) noised patches (the model input)
    noise: torch.Tensor       # (N, P) the ε that noised them
    timesteps: torch.Tensor   # (N,) long: the timestep of each patch's span
    span_index: torch.Tensor  # (N,) long: which span (0 … num_spans-1) each patch belongs to

    def to(self, device) -> "SpanData":
        return SpanData(*(getattr(self, f).to(device) for f in
                          ("rows", "x0", "x_t", "noise", "timesteps", "span_index")))


@dataclass
class Batch:
    """A packed batch: everything :meth:`Model.forward` needs, no padding."""

    tokens: torch.Tensor          # (T,) long: text ids; PAD on span rows
    positions: torch.Tensor       # (T,) int32, or (T, 2) with ``axial`` for 2-D image positions
    axial: torch.Tensor | None    # (T,) bool: rows with 2-D (row, column) RoPE positions
    layout: Layout                # one document per sample, each span bidirectional
    targets: torch.Tensor         # (T,) long next-token targets, IGNORE_INDEX where no loss
    loss_rows: torch.Tensor       # (M,) long: rows whose target is not ignored
    spans: dict                   # modality name → SpanData
    span_sizes: torch.Tensor      # (S,) float32: patches per span
    span_timesteps: torch.Tensor  # (S,) long
    span_shapes: list = field(default_factory=list)   # per span: (modality name, item shape, sample)
    sample_lengths: list = field(default_factory=list)
    config: ModelConfig | None = None   # the config pack() built it with (checked by Model.forward)

    @property
    def num_spans(self) -> int:
        return int(self.span_sizes.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def to(self, device) -> "Batch":
        """The same batch on ``device``; the layout goes with its attention tile tables for
        ``device`` (built here, on the host: :meth:`Layout.to`)."""
        tile_sizes = () if self.config is None else ops.attention_tile_sizes(device, self.config.head_dim)
        batch = Batch(self.tokens.to(device), self.positions.to(device),
                      None if self.axial is None else self.axial.to(device),
                      self.layout.to(device, tile_sizes=tile_sizes),
                      self.targets.to(device), self.loss_rows.to(device),
                      {k: v.to(device) for k, v in self.spans.items()}, self.span_sizes.to(device),
                      self.span_timesteps.to(device), list(self.span_shapes), list(self.sample_lengths),
                      self.config)
        return batch.mark_dynamic() if "torch._dynamo" in sys.modules else batch

    def tensors(self) -> list:
        """Every tensor of the batch, its layout's and the layout's cached tile tables included."""
        found = [self.tokens, self.positions, self.targets, self.loss_rows, self.span_sizes,
                 self.span_timesteps, *([] if self.axial is None else [self.axial])]
        for s in self.spans.values():
            found += [s.rows, s.x0, s.x_t, s.noise, s.timesteps, s.span_index]
        return found + self.layout.tensors()

    def mark_dynamic(self) -> "Batch":
        """Mark the leading dim of every tensor as dynamic for ``torch.compile`` (returns self).

        Every length in a batch (tokens, loss rows, span rows, spans, documents, tiles) changes
        from one batch to the next; marked, a compiled model traces them symbolically the first
        time instead of specializing on the first batch and recompiling on the second. Sizes 0
        and 1 are still specialized by torch.compile (one more compilation when such a size
        first changes). :func:`pack` and :meth:`to` call this once ``torch._dynamo`` is loaded
        (that is, once ``torch.compile`` has been used in the process): importing it only for
        this would add seconds to every eager program.
        """
        from torch._dynamo import maybe_mark_dynamic
        for t in self.tensors():
            if t.dim():
                maybe_mark_dynamic(t, 0)
        return self


#: The ModelConfig fields that decide what a packed batch holds (token ids, the span rows of each
#: modality and their patch size, timesteps, RoPE positions): a model reads a batch only if they match.
PACKED_FIELDS = ("vocab_size", "bos_id", "eos_id", "boi_id", "eoi_id", "pad_id", "modalities", "diffusion_steps",
                 "schedule", "span_positions")


def check_batch_config(batch: Batch, config: ModelConfig) -> None:
    """Raise ``ValueError`` naming every differing field when ``batch`` was packed with a config
    that the model of ``config`` cannot read (see :data:`PACKED_FIELDS`)."""
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be a transfusion_fast.Batch (from pack), got {type(batch).__name__}")
    if batch.config is None or batch.config is config:
        return
    diffs = [f"{name}: batch {getattr(batch.config, name)!r}, model {getattr(config, name)!r}"
             for name in PACKED_FIELDS if getattr(batch.config, name) != getattr(config, name)]
    if diffs:
        raise ValueError("the batch was packed with a ModelConfig this model cannot read; differing fields: "
                         + "; ".join(diffs) + " (pack with the model's config)")


# ------------------------------------------------------------------------------------- patches
def to_patches(modality: ModalityConfig, item: torch.Tensor) -> torch.Tensor:
    """An image ``(C, H, W)`` or a series ``(L, F)`` → patch rows ``(N, P)`` float32."""
    p = modality.patch_size
    if modality.kind == "image":
        return ops.patchify(item[None].float(), p)[0]                        # (H/p · W/p, p·p·C)
    return item.float().reshape(item.shape[0] // p, p * item.shape[1])      # (L/p, p·F)


def from_patches(modality: ModalityConfig, patches: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`to_patches`: ``(N, P)`` → the item of ``shape``."""
    if modality.kind == "image":
        return ops.unpatchify(patches[None].contiguous(), modality.patch_size, shape[-2], shape[-1])[0]
    return patches.reshape(shape[0], shape[1])


def span_positions(config: ModelConfig, modality: ModalityConfig, shape, start: int):
    """RoPE positions of a span whose first patch sits at in-document position ``start``.

    Returns ``(positions, axial)``: ``(N,)`` sequential positions, or under
    ``span_positions="axial"`` for images ``(N, 2)`` (start + row, start + column) and ``axial``
    True. Time series always use sequential positions.
    """
    n = modality.num_patches(shape)
    if config.span_positions == "axial" and modality.kind == "image":
        grid_w = shape[-1] // modality.patch_size
        idx = torch.arange(n)
        return torch.stack([start + idx // grid_w, start + idx % grid_w], dim=1), True
    seq = torch.arange(start, start + n)
    if config.span_positions == "axial":
        return torch.stack([seq, seq], dim=1), False
    return seq, False


# ------------------------------------------------------------------------------------- samples
@dataclass
class PreparedSample:
    """One validated sample as a document: token ids and its spans (offsets inside the document)."""

    tokens: torch.Tensor   # (L,) long, PAD on span rows
    spans: list            # [(offset, ModalityConfig, patches (N, P), item shape, followed_by_text)]

    @property
    def length(self) -> int:
        return int(self.tokens.numel())


def _resolve_modality(config: ModelConfig, item, where: str):
    if isinstance(item, tuple):
        if len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(f"{where}: a tuple item must be (modality_name, tensor), got {item!r:.80}")
        return config.modality(item[0]), item[1]
    kind = "image" if item.dim() == 3 else "sequence"
    candidates = [m for m in config.modalities if m.kind == kind]
    if not candidates:
        raise ValueError(f"{where}: got a {item.dim()}-D float tensor of shape {tuple(item.shape)} "
                         f"(a {kind}), but the config has no {kind} modality: "
                         f"{[(m.name, m.kind) for m in config.modalities]}")
    if len(candidates) > 1:
        channel_dim = 0 if kind == "image" else 1
        matching = [m for m in candidates if m.channels == item.shape[channel_dim]]
        if len(matching) != 1:
            raise ValueError(f"{where}: cannot tell which {kind} modality of "
                             f"{[m.name for m in candidates]} this {tuple(item.shape)} tensor is; "
                             f"pass (modality_name, tensor)")
        return matching[0], item
    return candidates[0], item


def check_span(m: ModalityConfig, item: torch.Tensor, where: str) -> None:
    """Raise ``ValueError`` unless ``item`` is a finite float image / series that modality ``m``
    accepts (channels, patch multiples, ``max_size``); ``where`` names it in the message."""
    if not item.is_floating_point():
        raise ValueError(f"{where}: a {m.kind} item for modality {m.name!r} must be floating point, "
                         f"got {item.dtype}")
    if not bool(torch.isfinite(item).all()):
        raise ValueError(f"{where}: {m.kind} item for modality {m.name!r} contains NaN or inf")
    p = m.patch_size
    if m.kind == "image":
        if item.dim() != 3:
            raise ValueError(f"{where}: an image for modality {m.name!r} must be (C, H, W), got shape "
                             f"{tuple(item.shape)}")
        c, h, w = item.shape
        if c != m.channels:
            raise ValueError(f"{where}: image for modality {m.name!r} must have {m.channels} channels, "
                             f"got {c} (shape {tuple(item.shape)})")
        for name, size in (("height", h), ("width", w)):
            if size % p or size == 0:
                raise ValueError(f"{where}: image {name} must be a positive multiple of the patch size "
                                 f"{p} of modality {m.name!r}, got {size} (shape {tuple(item.shape)})")
            if size > m.max_size:
                raise ValueError(f"{where}: image {name} must be at most max_size={m.max_size} of "
                                 f"modality {m.name!r}, got {size}")
    else:
        if item.dim() != 2:
            raise ValueError(f"{where}: a time series for modality {m.name!r} must be (frames, features), "
                             f"got shape {tuple(item.shape)}")
        frames, features = item.shape
        if features != m.channels:
            raise ValueError(f"{where}: time series for modality {m.name!r} must have {m.channels} "
                             f"features, got {features} (shape {tuple(item.shape)})")
        if frames == 0 or frames % p:
            raise ValueError(f"{where}: time series length must be a positive multiple of the patch size "
                             f"{p} of modality {m.name!r}, got {frames} frames")
        if frames > m.max_size:
            raise ValueError(f"{where}: time series length must be at most max_size={m.max_size} of "
                             f"modality {m.name!r}, got {frames} frames")


def prepare_sample(items, config: ModelConfig, *, add_bos: bool = True, add_eos: bool = True,
                   where: str = "sample", allow_empty: bool = False) -> PreparedSample:
    """Validate one sample and lay it out as a document (no noise yet).

    ``allow_empty`` accepts a sample without content (a generation prompt that is just BOS).
    """
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{where} must be a list of items (text tensors, images, time series), got "
                        f"{type(items).__name__}")
    pieces, spans, offset = [], [], 0
    if add_bos:
        pieces.append(torch.tensor([config.bos_id]))
        offset = 1
    content = 0
    for j, item in enumerate(items):
        at = f"{where}[{j}]"
        if not isinstance(item, (torch.Tensor, tuple)):
            raise TypeError(f"{at} must be a torch.Tensor or (modality_name, tensor), got {type(item).__name__}")
        if isinstance(item, torch.Tensor) and not item.is_floating_point():
            if item.dim() != 1 or item.dtype == torch.bool:
                raise ValueError(f"{at}: text must be a 1-D integer tensor of token ids, got "
                                 f"{item.dtype} of shape {tuple(item.shape)}")
            if item.numel() and (int(item.min()) < 0 or int(item.max()) >= config.vocab_size):
                raise ValueError(f"{at}: token ids must lie in [0, vocab_size={config.vocab_size}), got "
                                 f"values from {int(item.min())} to {int(item.max())}")
            pieces.append(item.detach().cpu().long())
            offset += item.numel()
            content += item.numel()
            if spans and item.numel():
                spans[-1] = spans[-1][:4] + (True,)
            continue
        m, tensor = _resolve_modality(config, item, at)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{at}: the span must be a torch.Tensor, got {type(tensor).__name__}")
        check_span(m, tensor, at)
        patches = to_patches(m, tensor.detach().cpu())
        n = patches.shape[0]
        pieces.append(torch.tensor([config.boi_of(m)]))
        pieces.append(torch.full((n,), config.pad_id))
        pieces.append(torch.tensor([config.eoi_of(m)]))
        spans.append((offset + 1, m, patches, tuple(tensor.shape), False))
        offset += n + 2
        content += n
    if content == 0 and not (allow_empty and add_bos):
        raise ValueError(f"{where} is empty: it needs at least one text token or one span, got "
                         f"{len(items)} item(s) with no content")
    if add_eos:
        pieces.append(torch.tensor([config.eos_id]))
    tokens = torch.cat(pieces).long()
    if tokens.numel() > config.max_seq_len:
        raise ValueError(f"{where} is {tokens.numel()} tokens long (with BOS/EOS and BOI/EOI), more than "
                         f"max_seq_len={config.max_seq_len}")
    return PreparedSample(tokens, spans)


def _drop_prefix_for_cfg(items):
    """The sample without the items before its first span (the unconditional case of CFG)."""
    for j, item in enumerate(items):
        if isinstance(item, tuple) or (isinstance(item, torch.Tensor) and item.is_floating_point()):
            return list(items[j:]) if j > 0 else None
    return None


def pack(samples, config: ModelConfig, *, seed: int = 0, device=None, add_bos: bool = True,
         add_eos: bool = True, cfg_drop_prob: float | None = None, caption_noise_prob: float = 0.8,
         caption_max_timestep: int = 500, timesteps=None) -> Batch:
    """Pack ``samples`` into one :class:`Batch` (deterministic given ``seed``).

    Args:
        samples: list of samples; each a list of text id tensors, images ``(C, H, W)`` and series
            ``(L, F)`` (or ``(modality_name, tensor)``) in order.
        config: the model's config (special tokens, modalities, schedule, max_seq_len).
        seed: seeds the CFG drop, the timesteps and the noise.
        device: where the batch lives (default CPU).
        cfg_drop_prob: probability that a sample loses the items before its first span (trains the
            unconditional model for classifier-free guidance); default ``config.cfg_drop_prob``.
        caption_noise_prob, caption_max_timestep: a span followed by text in its sample (image →
            caption) draws its timestep from ``[0, caption_max_timestep]`` with this probability, as
            the Transfusion paper does (80%, t ≤ 500); other spans draw from ``[0, T)``.
        timesteps: optional fixed timestep per span (int sequence), overriding the draw.
    """
    if not isinstance(samples, (list, tuple)) or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty list of samples, got "
                         f"{type(samples).__name__ if not isinstance(samples, (list, tuple)) else 'an empty list'}")
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    drop = config.cfg_drop_prob if cfg_drop_prob is None else check_float("cfg_drop_prob", cfg_drop_prob, 0.0, 1.0)
    check_float("caption_noise_prob", caption_noise_prob, 0.0, 1.0)
    T = config.diffusion_steps
    check_int("caption_max_timestep", caption_max_timestep, 0, T - 1)
    add_bos, add_eos = check_bool("add_bos", add_bos), check_bool("add_eos", add_eos)
    gen = torch.Generator().manual_seed(check_int("seed", seed, 0, MAX_SEED - 1))

    prepared = []
    for i, sample in enumerate(samples):
        draw = float(torch.rand((), generator=gen))
        if isinstance(sample, (list, tuple)) and draw < drop:
            dropped = _drop_prefix_for_cfg(sample)
            sample = dropped if dropped is not None else sample
        prepared.append(prepare_sample(sample, config, add_bos=add_bos, add_eos=add_eos,
                                       where=f"samples[{i}]"))

    lengths = [s.length for s in prepared]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    cu = torch.tensor(starts, dtype=torch.int64)
    tokens = torch.cat([s.tokens for s in prepared])
    total = tokens.numel()

    # Spans: timestep, noise, rows; global span order is document order.
    all_spans = [(i, sp) for i, s in enumerate(prepared) for sp in s.spans]
    if timesteps is not None:
        timesteps = check_int_list("timesteps", timesteps, 0, T - 1)
        if len(timesteps) != len(all_spans):
            raise ValueError(f"timesteps must give one value in [0, {T}) per span ({len(all_spans)} spans), "
                             f"got {len(timesteps)} values")
    span_bounds, span_t, span_sizes, span_shapes = [], [], [], []
    per_mod: dict = {}
    is_span = torch.zeros(total, dtype=torch.bool)
    positions_override = []
    for k, (i, (offset, m, x0, shape, followed_by_text)) in enumerate(all_spans):
        if timesteps is not None:
            t = timesteps[k]
        else:
            full = int(torch.randint(0, T, (), generator=gen))
            clean = int(torch.randint(0, caption_max_timestep + 1, (), generator=gen))
            use_clean = float(torch.rand((), generator=gen)) < caption_noise_prob
            t = clean if (followed_by_text and use_clean) else full
        noise = torch.randn(x0.shape, generator=gen)
        n = x0.shape[0]
        start = starts[i] + offset
        rows = torch.arange(start, start + n)
        is_span[start:start + n] = True
        span_bounds.append((start, start + n))
        span_t.append(t)
        span_sizes.append(n)
        span_shapes.append((m.name, shape, i))
        positions_override.append((rows, *span_positions(config, m, shape, offset)))
        d = per_mod.setdefault(m.name, {"rows": [], "x0": [], "noise": [], "t": [], "idx": []})
        d["rows"].append(rows)
        d["x0"].append(x0)
        d["noise"].append(noise)
        d["t"].append(torch.full((n,), t, dtype=torch.int64))
        d["idx"].append(torch.full((n,), k, dtype=torch.int64))

    schedule = get_schedule(config.schedule, config.diffusion_steps)
    spans = {}
    for name, d in per_mod.items():
        x0, noise, t = torch.cat(d["x0"]), torch.cat(d["noise"]), torch.cat(d["t"])
        x_t, _ = ops.add_noise(x0, t, schedule, noise)
        spans[name] = SpanData(torch.cat(d["rows"]), x0, x_t, noise, t, torch.cat(d["idx"]))

    spans_t = torch.tensor(span_bounds, dtype=torch.int64).reshape(-1, 2)
    layout = Layout.transfusion(cu, spans_t) if spans_t.shape[0] else Layout.causal(cu)

    # Next-token targets: text rows whose next row is text of the same document; never into or
    # inside a span (BOI → patch has no target: the patch comes from the diffusion sampler).
    last_of_doc = torch.zeros(total, dtype=torch.bool)
    last_of_doc[cu[1:] - 1] = True
    next_is_span = torch.roll(is_span, -1)
    has_target = ~is_span & ~next_is_span & ~last_of_doc
    targets = torch.where(has_target, torch.roll(tokens, -1), torch.full_like(tokens, IGNORE_INDEX))

    positions = layout.positions.long()
    axial = None
    if config.span_positions == "axial":
        positions = torch.stack([positions, positions], dim=1)
        axial = torch.zeros(total, dtype=torch.bool)
        for rows, pos, is_axial in positions_override:
            positions[rows] = pos
            axial[rows] = is_axial
    positions = positions.to(torch.int32)

    batch = Batch(tokens, positions, axial, layout, targets, torch.nonzero(has_target).flatten(),
                  spans, torch.tensor(span_sizes, dtype=torch.float32),
                  torch.tensor(span_t, dtype=torch.int64), span_shapes, lengths, config)
    if device is not None and torch.device(device).type != "cpu":
        return batch.to(device)
    for pair in ops.attention_tile_sizes("cpu", config.head_dim):
        layout.tile_table(*pair)
    return batch.mark_dynamic() if "torch._dynamo" in sys.modules else batch
