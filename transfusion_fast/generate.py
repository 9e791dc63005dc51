"""Mixed-modal generation with a KV cache: text by sampling, spans by the diffusion sampler.

Small functions, top to bottom, as in gpt-fast: :func:`prefill` runs the prompts once;
:func:`text_step` samples one token for every stream that writes text; :func:`span_step` samples
the span each stream opened with a BOI (:func:`sample_span`: the diffusion loop) and feeds its EOI;
:func:`generate` validates the arguments and alternates the two steps until every stream is done.
A :class:`Stream` holds one prompt's state; :class:`Sampling` the settings of the call.

Every forward call is packed: the participating documents' new rows are the queries of a
``Layout.decode`` whose keys are each document's cached keys followed by its new rows. A span is
sampled with its document's prefix KV computed once (it is in the cache): each diffusion step only
runs the span's rows, attending to the cached prefix and bidirectionally to the span itself. With
classifier-free guidance the unconditional twin of each document is ``[BOS, BOI]`` + the span (the
prefix dropped, as in training with ``cfg_drop_prob``), batched into the same call.

The functions take the model as a :class:`~transfusion_fast.Model` (its ``config``, ``schedule``,
``embed``, ``forward_hidden``, ``decode_spans`` and ``output``) without importing model.py, so that
``Model.generate`` can call :func:`generate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import ops
from .checks import MAX_SEED, MAX_SIZE, check_bool, check_float, check_int
from .config import ModalityConfig, ModelConfig
from .layout import Layout
from .pack import check_span, from_patches, prepare_sample, span_positions

__all__ = ["generate", "prefill", "text_step", "span_step", "sample_span", "sample_tokens", "Sampling",
           "Stream", "KVCache"]


# ------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys/values of every layer for a set of documents, grown as generation proceeds."""

    def __init__(self, depth: int):
        self.depth = depth
        self.keys: dict = {}      # doc → [layer] (L, Hkv, D)
        self.values: dict = {}
        self.lengths: dict = {}
        self._next_doc = 0

    def new_doc(self) -> int:
        doc, self._next_doc = self._next_doc, self._next_doc + 1
        self.keys[doc], self.values[doc] = [None] * self.depth, [None] * self.depth
        self.lengths[doc] = 0
        return doc

    def drop(self, doc: int) -> None:
        del self.keys[doc], self.values[doc], self.lengths[doc]


class _StepKV:
    """Packed keys/values of one forward call: each document's cache, then its new rows.

    Buffers are filled from the cache once, on first use; calling the same step again (one
    diffusion step after another) only overwrites the new rows.
    """

    def __init__(self, cache: KVCache, docs: list, q_lens: list, device):
        self.cache, self.docs, self.q_lens = cache, docs, q_lens
        self.past = [cache.lengths[d] for d in docs]
        starts = [0]
        for p, q in zip(self.past, q_lens):
            starts.append(starts[-1] + p + q)
        self.starts = starts
        self.new_rows = torch.cat([torch.arange(s + p, e) for s, p, e in
                                   zip(starts[:-1], self.past, starts[1:])]).to(device)
        self.k = [None] * cache.depth
        self.v = [None] * cache.depth

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is None:
            shape = (self.starts[-1], *k.shape[1:])
            self.k[layer], self.v[layer] = k.new_empty(shape), v.new_empty(shape)
            for doc, s, p in zip(self.docs, self.starts[:-1], self.past):
                if p:
                    self.k[layer][s:s + p] = self.cache.keys[doc][layer]
                    self.v[layer][s:s + p] = self.cache.values[doc][layer]
        self.k[layer].index_copy_(0, self.new_rows, k)
        self.v[layer].index_copy_(0, self.new_rows, v)
        return self.k[layer], self.v[layer]

    def commit(self) -> None:
        """Make the new rows part of each document's cache."""
        for i, doc in enumerate(self.docs):
            s, e = self.starts[i], self.starts[i + 1]
            for layer in range(self.cache.depth):
                self.cache.keys[doc][layer] = self.k[layer][s:e]
                self.cache.values[doc][layer] = self.v[layer][s:e]
            self.cache.lengths[doc] += self.q_lens[i]


class _Forward:
    """One packed forward over new rows of several documents, reusable with new span inputs.

    ``chunks[i] = (tokens (q,), spans [(offset, modality, shape, ...)])`` are document ``docs[i]``'s new
    rows; span inputs are passed per call as ``{modality name: (x (N, P), t (N,))}`` in doc order.
    """

    def __init__(self, model: nn.Module, cache: KVCache, docs: list, chunks: list):
        config, device = model.config, model.output.weight.device
        self.model = model
        q_lens = [int(tokens.numel()) for tokens, _ in chunks]
        self.kv = _StepKV(cache, docs, q_lens, device)
        past, starts = self.kv.past, self.kv.starts
        positions, axial, spans_abs, rows = [], [], [], {}
        q_start = 0
        for i, (tokens, spans) in enumerate(chunks):
            pos = torch.arange(past[i], past[i] + q_lens[i])
            pos2 = torch.stack([pos, pos], 1)
            ax = torch.zeros(q_lens[i], dtype=torch.bool)
            for offset, m, shape, *_ in spans:
                n = m.num_patches(shape)
                sp, is_axial = span_positions(config, m, shape, past[i] + offset)
                if sp.dim() == 1:
                    pos[offset:offset + n] = sp
                else:
                    pos2[offset:offset + n] = sp
                ax[offset:offset + n] = is_axial
                spans_abs.append((starts[i] + past[i] + offset, starts[i] + past[i] + offset + n))
                rows.setdefault(m.name, []).append(torch.arange(q_start + offset, q_start + offset + n))
            positions.append(pos2 if config.span_positions == "axial" else pos)
            axial.append(ax)
            q_start += q_lens[i]
        self.tokens = torch.cat([t for t, _ in chunks]).to(device)
        self.positions = torch.cat(positions).to(device=device, dtype=torch.int32)
        self.axial = torch.cat(axial).to(device) if config.span_positions == "axial" else None
        # Built on the host and shipped with its tile tables in one copy (Layout.to).
        layout = Layout.decode(torch.tensor(starts, dtype=torch.int64), torch.tensor(q_lens),
                               torch.tensor(spans_abs, dtype=torch.int64).reshape(-1, 2))
        self.layout = layout if torch.device(device).type == "cpu" else layout.to(
            device, tile_sizes=ops.attention_tile_sizes(device, config.head_dim))
        self.rows = {name: torch.cat(r).to(device) for name, r in rows.items()}
        self.last_rows = self.layout.q_cu_seqlens[1:].long() - 1

    def __call__(self, span_inputs: dict | None = None) -> torch.Tensor:
        span_inputs = span_inputs or {}
        spans = {name: (self.rows[name], *span_inputs[name]) for name in self.rows}
        h, cond, span_rows = self.model.embed(self.tokens, spans)
        return self.model.forward_hidden(h, self.positions, self.axial, self.layout, cond, span_rows,
                                         kv_cache=self.kv)

    def commit(self) -> None:
        self.kv.commit()


# ------------------------------------------------------------------------------------- state
@dataclass(frozen=True)
class Sampling:
    """The settings of one :func:`generate` call (validated there)."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    sampler: str                  # "ddim" | "ddpm"
    num_inference_steps: int
    cfg_scale: float              # 1: no guidance
    eta: float
    add_bos: bool
    stop_at_eos: bool
    progress: bool
    boi_modality: dict            # BOI id -> the modality whose span it opens
    shapes: dict                  # modality name -> shape of its generated spans


@dataclass(eq=False)
class Stream:
    """One prompt's generation: its document in the KV cache and what it has produced so far."""

    doc: int
    items: list = field(default_factory=list)    # finished items: text id tensors and spans
    text: list = field(default_factory=list)     # text ids since the last span
    new_tokens: int = 0                          # sampled text tokens (an EOI after a span is not)
    done: bool = False
    next_span: ModalityConfig | None = None      # the span the last token fed (a BOI) opened
    logits: torch.Tensor | None = None           # next-token logits after the last token fed

    def add_span(self, span: torch.Tensor, eoi: int) -> None:
        """Close the text before ``span`` (empty when the prompt itself ended with BOI), keep the
        span, and start the next text with its EOI."""
        if self.text:
            self.items.append(torch.tensor(self.text, dtype=torch.long))
        self.items.append(span)
        self.text = [eoi]

    def finish(self) -> list:
        if self.text:
            self.items.append(torch.tensor(self.text, dtype=torch.long))
        return self.items


# ------------------------------------------------------------------------------------- sampling
def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                  generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` (B, V): greedy at temperature 0, else top-k / top-p sampling."""
    logits = logits.float().cpu()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # Drop a token when the tokens ranked before it already hold top_p of the mass.
        drop = (torch.cumsum(probs, -1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------- arguments
def _check_generate_args(config, prompts, max_new_tokens, temperature, top_k, top_p, sampler,
                         num_inference_steps, cfg_scale, eta):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of prompts (each a list of items), got "
                         f"{prompts if not isinstance(prompts, (list, tuple)) else 'an empty list'!r:.80}")
    check_int("max_new_tokens", max_new_tokens, 0, MAX_SIZE)
    check_float("temperature (0 = greedy)", temperature, 0.0)
    if top_k is not None:
        check_int("top_k", top_k, 1, MAX_SIZE)
    if top_p is not None:
        check_float("top_p", top_p, 0.0, 1.0, low_open=True)
    if not isinstance(sampler, str) or sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    check_int("num_inference_steps", num_inference_steps, 1, config.diffusion_steps)
    check_float("cfg_scale (1 = no guidance)", cfg_scale, 0.0)
    check_float("eta", eta, 0.0)


def _boi_modalities(config: ModelConfig, modality: str | None) -> dict:
    """BOI id -> the modality whose span it opens (``modality`` when given, else the first
    modality of each BOI id)."""
    boi_modality = {}
    for m in config.modalities:
        if modality is None or m.name == modality:
            boi_modality.setdefault(config.boi_of(m), m)
    if modality is not None and not boi_modality:
        raise ValueError(f"modality must be one of {[m.name for m in config.modalities]}, got {modality!r}")
    return boi_modality


def _span_shapes(config: ModelConfig, boi_modality: dict, span_shape, modality: str | None) -> dict:
    """modality name -> the shape of its generated spans (see :func:`generate`'s ``span_shape``)."""
    if isinstance(span_shape, dict):
        names = [m.name for m in config.modalities]
        unknown = sorted(str(k) for k in span_shape if k not in names)
        if unknown:
            raise ValueError(f"span_shape names unknown modalities {unknown}; the config has {names}")
    elif span_shape is not None and not config.modalities:
        raise ValueError(f"span_shape={span_shape!r} but the config has no modality to generate")
    default_modality = modality or (config.modalities[0].name if config.modalities else None)
    return {m.name: _span_shape_for(m, span_shape, default_modality) for m in boi_modality.values()}


def _span_shape_for(m: ModalityConfig, span_shape, default_modality: str | None) -> tuple:
    if isinstance(span_shape, dict):
        shape = span_shape.get(m.name)
    else:
        shape = span_shape if m.name == default_modality else None
    where = f"span_shape for modality {m.name!r}"
    if shape is None:
        shape = m.default_shape
    elif not isinstance(shape, (tuple, list, torch.Size)):
        raise ValueError(f"{where} must be a tuple of ints, got {shape!r}")
    else:
        shape = tuple(check_int(f"{where}[{i}]", s, 1, m.max_size if i else MAX_SIZE) for i, s in enumerate(shape))
    if m.kind == "image" and len(shape) == 2:
        shape = (m.channels, *shape)
    check_span(m, torch.zeros(shape), where)
    return shape


def _check_room(config: ModelConfig, prepared: list, boi_modality: dict, shapes: dict, max_new_tokens: int) -> None:
    """Every prompt must leave room in its document (``config.max_seq_len`` rows) for what it asks
    for: the span it forces when it ends with a BOI (and that span's EOI), else one new token."""
    for i, sample in enumerate(prepared):
        length = sample.length
        m = boi_modality.get(int(sample.tokens[-1])) if length else None
        if m is not None:
            need = m.num_patches(shapes[m.name]) + 1
            if length + need > config.max_seq_len:
                raise ValueError(f"prompts[{i}] ends with a BOI, which asks for a {m.name!r} span of shape "
                                 f"{shapes[m.name]} ({need - 1} rows + EOI), but the prompt is {length} rows long "
                                 f"and max_seq_len={config.max_seq_len} leaves room for {config.max_seq_len - length}")
        elif max_new_tokens and length >= config.max_seq_len:
            raise ValueError(f"prompts[{i}] is {length} rows long (with BOS and BOI/EOI), which leaves no room "
                             f"under max_seq_len={config.max_seq_len} for a new token")


# ------------------------------------------------------------------------------------- steps
def _feed(model: nn.Module, cache: KVCache, streams: list, chunks: list, settings: Sampling) -> None:
    """Run new rows ``chunks[j] = (tokens, [(offset, modality, shape, patches)])`` of ``streams[j]``
    through the model, keep them in the cache, and keep each stream's next-token logits. A chunk
    always ends with a text token (a span is followed by its EOI)."""
    device = model.output.weight.device
    fwd = _Forward(model, cache, [s.doc for s in streams], chunks)
    spans = {name: (torch.cat([p for _, items in chunks for _, m, _, p in items if m.name == name]).to(device),
                    torch.zeros(rows.numel(), dtype=torch.long, device=device))
             for name, rows in fwd.rows.items()}
    h = fwd(spans)
    fwd.commit()
    logits = model.output(h[fwd.last_rows]).float()
    for j, (stream, (tokens, _)) in enumerate(zip(streams, chunks)):
        stream.next_span = settings.boi_modality.get(int(tokens[-1]))
        stream.logits = logits[j]


def prefill(model: nn.Module, cache: KVCache, streams: list, prepared: list, settings: Sampling) -> None:
    """Run every prompt (a :class:`~transfusion_fast.pack.PreparedSample`) through the model once."""
    _feed(model, cache, streams, [(s.tokens, [(offset, m, shape, patches) for offset, m, patches, shape, _
                                              in s.spans]) for s in prepared], settings)


def text_step(model: nn.Module, cache: KVCache, streams: list, settings: Sampling,
              gen: torch.Generator) -> None:
    """Sample one token for each of ``streams``; feed it unless it ends the stream (EOS, a full
    document, or the token budget spent on anything but a BOI)."""
    config = model.config
    chosen = sample_tokens(torch.stack([s.logits for s in streams]), settings.temperature, settings.top_k,
                           settings.top_p, gen)
    fed = []
    for stream, token in zip(streams, chosen.tolist()):
        stream.text.append(token)
        stream.new_tokens += 1
        full = cache.lengths[stream.doc] + 1 >= config.max_seq_len   # this token fills it
        if (settings.stop_at_eos and token == config.eos_id) or full or (
                stream.new_tokens >= settings.max_new_tokens and token not in settings.boi_modality):
            stream.done = True
        else:
            fed.append((stream, token))
    if fed:
        _feed(model, cache, [s for s, _ in fed], [(torch.tensor([token]), []) for _, token in fed], settings)


def span_step(model: nn.Module, cache: KVCache, streams: list, settings: Sampling,
              gen: torch.Generator) -> None:
    """Sample the span each of ``streams`` opened, batched per modality, then feed its EOI. A stream
    whose document has no room left for the span and its EOI ends instead."""
    config = model.config
    groups: dict = {}
    for stream in streams:
        groups.setdefault(stream.next_span.name, (stream.next_span, []))[1].append(stream)
    for m, group in groups.values():
        shape = settings.shapes[m.name]
        n = m.num_patches(shape)
        fits = []
        for stream in group:
            stream.next_span = None
            if cache.lengths[stream.doc] + n + 1 <= config.max_seq_len:
                fits.append(stream)
            else:
                stream.done = True
        if not fits:
            continue
        spans = sample_span(model, cache, [s.doc for s in fits], m, shape, gen, settings)
        eoi = config.eoi_of(m)
        for stream, span in zip(fits, spans):
            stream.add_span(span, eoi)
        _feed(model, cache, fits, [(torch.tensor([eoi]), []) for _ in fits], settings)
        for stream in fits:
            if stream.new_tokens >= settings.max_new_tokens:
                stream.done = True


# ------------------------------------------------------------------------------------- one span
def sample_span(model: nn.Module, cache: KVCache, docs: list, m: ModalityConfig, shape,
                gen: torch.Generator, settings: Sampling) -> list:
    """Sample one span of modality ``m`` for each of ``docs`` (their prefixes, ending in BOI, are
    cached); the clean span joins each document's cache. Returns the spans (CPU float32)."""
    config = model.config
    device = model.output.weight.device
    n, G = m.num_patches(shape), len(docs)
    uncond = _unconditional_twins(model, cache, G, m, settings.add_bos) if settings.cfg_scale != 1.0 else []
    span_chunk = (torch.full((n,), config.pad_id), [(0, m, shape)])
    step = _Forward(model, cache, docs + uncond, [span_chunk] * (G + len(uncond)))
    x = _denoise(model, step, m, G * n, gen, settings)

    # Later text attends to the clean span (timestep 0), as in training.
    clean = _Forward(model, cache, docs, [span_chunk] * G)
    clean({m.name: (x, torch.zeros(G * n, dtype=torch.long, device=device))})
    clean.commit()
    for doc in uncond:
        cache.drop(doc)
    return [from_patches(m, x[g * n:(g + 1) * n].float().cpu(), shape) for g in range(G)]


def _unconditional_twins(model: nn.Module, cache: KVCache, count: int, m: ModalityConfig,
                         add_bos: bool) -> list:
    """``count`` new documents ``[BOS, BOI]``, prefilled: the unconditional side of guidance."""
    config = model.config
    prefix = torch.tensor(([config.bos_id] if add_bos else []) + [config.boi_of(m)])
    docs = [cache.new_doc() for _ in range(count)]
    twin = _Forward(model, cache, docs, [(prefix, []) for _ in docs])
    twin()
    twin.commit()
    return docs


def _denoise(model: nn.Module, step: _Forward, m: ModalityConfig, rows: int, gen: torch.Generator,
             settings: Sampling) -> torch.Tensor:
    """The diffusion sampler: ``rows`` span rows (conditional documents first in ``step``, then
    their unconditional twins) from pure noise to x0, one packed forward per step."""
    config, schedule = model.config, model.schedule
    device = model.output.weight.device
    guided = settings.cfg_scale != 1.0
    span_rows = step.rows[m.name]
    timesteps = sorted({int(t) for t in ops.inference_timesteps(config.diffusion_steps,
                                                                settings.num_inference_steps)}, reverse=True)
    x = torch.randn(rows, m.patch_dim, generator=gen).to(device)
    step_fn = ops.ddim_step if settings.sampler == "ddim" else ops.ddpm_step
    extra = {"eta": settings.eta} if settings.sampler == "ddim" else {}
    bar = tqdm(total=len(timesteps), disable=not settings.progress, desc=f"diffusion[{m.name}]", leave=False)
    for k, t in enumerate(timesteps):
        t_prev = timesteps[k + 1] if k + 1 < len(timesteps) else -1
        x_in = torch.cat([x, x]) if guided else x
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.long, device=device)
        out = model.decode_spans(step({m.name: (x_in, t_in)}), m.name, span_rows).float()
        # Step noise is drawn on the device by the op (Philox) from a seed of our generator.
        step_seed = int(torch.randint(0, 2**62, (), generator=gen))
        x = step_fn(x, out[:rows], torch.full((rows,), t, dtype=torch.long, device=device),
                    torch.full((rows,), t_prev, dtype=torch.long, device=device), schedule,
                    prediction=config.prediction, uncond_out=out[rows:] if guided else None,
                    cfg_scale=settings.cfg_scale, seed=step_seed, **extra)
        bar.update(1)
    bar.close()
    return x


# ------------------------------------------------------------------------------------- generate
@torch.no_grad()
def generate(model: nn.Module, prompts, *, max_new_tokens: int = 64, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             sampler: str = "ddim", num_inference_steps: int = 250, cfg_scale: float = 5.0,
             eta: float = 0.0, span_shape=None, modality: str | None = None, progress: bool = True,
             add_bos: bool = True, stop_at_eos: bool = True):
    """Continue every prompt with text and, after each BOI, a span from the diffusion sampler.

    Args:
        prompts: list of prompts, each a list of items like a :func:`pack` sample (text id
            tensors, images, time series); images in a prompt condition the text (captioning).
            A prompt whose text ends with a BOI token forces a span first.
        max_new_tokens: sampled text tokens per prompt (EOI after a span is not counted).
        temperature, top_k, top_p: text sampling (temperature 0 = greedy).
        seed: seeds every draw (tokens and diffusion noise): same seed, same output.
        sampler: ``"ddim"`` (``eta`` 0 = deterministic) or ``"ddpm"``; ``num_inference_steps`` of them.
        cfg_scale: classifier-free guidance against the unconditional ``[BOS, BOI, span]`` twin;
            1 disables guidance (no unconditional pass).
        span_shape: ``{modality: shape}`` of generated spans (``(C, H, W)`` or ``(H, W)`` for
            images, ``(L, F)`` for series), or one shape for ``modality`` (default: the first
            modality); modalities without a shape get their largest.
        modality: which modality a BOI generates when several share it (default: the first).
        progress: show a tqdm bar over the diffusion steps.
    Returns:
        For each prompt, the generated continuation as a list of items: 1-D LongTensors of text
        ids (including BOI, EOI and EOS as produced) and the generated spans (CPU float32), in order.
    """
    config = model.config
    _check_generate_args(config, prompts, max_new_tokens, temperature, top_k, top_p, sampler,
                         num_inference_steps, cfg_scale, eta)
    boi_modality = _boi_modalities(config, modality)
    shapes = _span_shapes(config, boi_modality, span_shape, modality)
    add_bos, stop_at_eos = check_bool("add_bos", add_bos), check_bool("stop_at_eos", stop_at_eos)
    seed = check_int("seed", seed, 0, MAX_SEED - 1)
    prepared = [prepare_sample(p, config, add_bos=add_bos, add_eos=False, where=f"prompts[{i}]",
                               allow_empty=add_bos) for i, p in enumerate(prompts)]
    _check_room(config, prepared, boi_modality, shapes, max_new_tokens)
    settings = Sampling(max_new_tokens, temperature, top_k, top_p, sampler, num_inference_steps, cfg_scale,
                        eta, add_bos, stop_at_eos, progress, boi_modality, shapes)

    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(seed)
        cache = KVCache(config.depth)
        streams = [Stream(cache.new_doc()) for _ in prompts]
        prefill(model, cache, streams, prepared, settings)
        while active := [s for s in streams if not s.done]:
            spanning = [s for s in active if s.next_span is not None]
            if spanning:
                span_step(model, cache, spanning, settings, gen)
            elif max_new_tokens == 0:
                break
            else:
                text_step(model, cache, active, settings, gen)
        return [s.finish() for s in streams]
    finally:
        model.train(was_training)
