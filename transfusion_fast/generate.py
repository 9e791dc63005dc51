"""Mixed-modal generation with a KV cache: text by sampling, spans by the diffusion sampler.

Every forward call is packed: the participating documents' new rows are the queries of a
``Layout.decode`` whose keys are each document's cached keys followed by its new rows. A span is
sampled with its document's prefix KV computed once (it is in the cache): each diffusion step only
runs the span's rows, attending to the cached prefix and bidirectionally to the span itself. With
classifier-free guidance the unconditional twin of each document is ``[BOS, BOI]`` + the span (the
prefix dropped, as in training with ``cfg_drop_prob``), batched into the same call.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import ops
from .layout import Layout
from .model import Model
from .pack import check_span, from_patches, prepare_sample, span_positions

__all__ = ["generate", "KVCache", "sample_tokens"]


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

    def __init__(self, model: Model, cache: KVCache, docs: list, chunks: list):
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
        cu = torch.tensor(starts, dtype=torch.int64, device=device)
        spans_t = torch.tensor(spans_abs, dtype=torch.int64, device=device).reshape(-1, 2)
        self.layout = Layout.decode(cu, torch.tensor(q_lens, device=device), spans_t)
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


def _check_generate_args(config, prompts, max_new_tokens, temperature, top_k, top_p, sampler,
                         num_inference_steps, cfg_scale, eta):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of prompts (each a list of items), got "
                         f"{prompts if not isinstance(prompts, (list, tuple)) else 'an empty list'!r:.80}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a float >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= config.diffusion_steps:
        raise ValueError(f"num_inference_steps must be an int in [1, {config.diffusion_steps}], got "
                         f"{num_inference_steps!r}")
    if not isinstance(cfg_scale, (int, float)) or cfg_scale < 0:
        raise ValueError(f"cfg_scale must be a float >= 0 (1 = no guidance), got {cfg_scale!r}")
    if not isinstance(eta, (int, float)) or eta < 0:
        raise ValueError(f"eta must be a float >= 0, got {eta!r}")


def _span_shape_for(config, m, span_shape, default_modality):
    if isinstance(span_shape, dict):
        shape = span_shape.get(m.name)
    else:
        shape = span_shape if m.name == default_modality else None
    shape = m.default_shape if shape is None else tuple(int(s) for s in shape)
    if m.kind == "image" and len(shape) == 2:
        shape = (m.channels, *shape)
    check_span(m, torch.zeros(shape), f"span_shape for modality {m.name!r}")
    return shape


# ------------------------------------------------------------------------------------- generate
@torch.no_grad()
def generate(model: Model, prompts, *, max_new_tokens: int = 64, temperature: float = 1.0,
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
    boi_modality = {}
    for m in config.modalities:
        if modality is None or m.name == modality:
            boi_modality.setdefault(config.boi_of(m), m)
    if modality is not None and not boi_modality:
        raise ValueError(f"modality must be one of {[m.name for m in config.modalities]}, got {modality!r}")
    default_modality = modality or config.modalities[0].name
    shapes = {m.name: _span_shape_for(config, m, span_shape, default_modality) for m in boi_modality.values()}
    prepared = [prepare_sample(p, config, add_bos=add_bos, add_eos=False, where=f"prompts[{i}]",
                               allow_empty=add_bos) for i, p in enumerate(prompts)]

    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(int(seed))
        cache = KVCache(config.depth)
        docs = [cache.new_doc() for _ in prompts]
        items = [[] for _ in prompts]
        text = [[] for _ in prompts]
        new_tokens = [0] * len(prompts)
        done = [False] * len(prompts)
        need_span: dict = {}      # prompt → modality whose span comes next
        logits: dict = {}         # prompt → next-token logits

        device = model.output.weight.device

        def feed(indices, chunks):
            """Run new rows ``chunks[j] = (tokens, [(offset, modality, shape, patches)])`` of
            prompts ``indices`` through the model and keep their next-token logits. A chunk
            always ends with a text token (a span is followed by its EOI)."""
            fwd = _Forward(model, cache, [docs[i] for i in indices], chunks)
            h = fwd({name: (torch.cat([p for _, s in chunks for _, mm, _, p in s if mm.name == name]).to(device),
                            torch.zeros(rows.numel(), dtype=torch.long, device=device))
                     for name, rows in fwd.rows.items()})
            fwd.commit()
            out = model.output(h[fwd.last_rows]).float()
            for j, i in enumerate(indices):
                last = int(chunks[j][0][-1])
                if last in boi_modality:
                    need_span[i] = boi_modality[last]
                logits[i] = out[j]

        feed(list(range(len(prompts))),
             [(s.tokens, [(off, m, shape, patches) for off, m, patches, shape, _ in s.spans])
              for s in prepared])

        while True:
            active = [i for i in range(len(prompts)) if not done[i]]
            if not active:
                break
            spanning = [i for i in active if i in need_span]
            if spanning:
                groups: dict = {}
                for i in spanning:
                    groups.setdefault(need_span[i].name, (need_span[i], []))[1].append(i)
                for m, group in groups.values():
                    shape = shapes[m.name]
                    n = m.num_patches(shape)
                    fits = [i for i in group if cache.lengths[docs[i]] + n + 1 <= config.max_seq_len]
                    for i in group:
                        del need_span[i]
                        if i not in fits:
                            done[i] = True
                    if not fits:
                        continue
                    spans_out = _sample_span(model, cache, [docs[i] for i in fits], m, shape, gen,
                                             sampler, num_inference_steps, cfg_scale, eta, add_bos,
                                             progress)
                    eoi = config.eoi_of(m)
                    for i, span in zip(fits, spans_out):
                        if text[i]:   # empty when the prompt itself ended with BOI
                            items[i].append(torch.tensor(text[i], dtype=torch.long))
                        items[i].append(span)
                        text[i] = [eoi]
                    feed(fits, [(torch.tensor([eoi]), []) for _ in fits])
                    for i in fits:
                        if new_tokens[i] >= max_new_tokens:
                            done[i] = True
                continue
            if max_new_tokens == 0:
                break
            chosen = sample_tokens(torch.stack([logits[i] for i in active]), temperature, top_k, top_p, gen)
            to_feed = []
            for i, tok in zip(active, chosen.tolist()):
                text[i].append(tok)
                new_tokens[i] += 1
                full = cache.lengths[docs[i]] + 1 >= config.max_seq_len   # this token fills it
                if (stop_at_eos and tok == config.eos_id) or full or (
                        new_tokens[i] >= max_new_tokens and tok not in boi_modality):
                    done[i] = True
                else:
                    to_feed.append((i, tok))
            if to_feed:
                feed([i for i, _ in to_feed], [(torch.tensor([tok]), []) for _, tok in to_feed])
        for i in range(len(prompts)):
            if text[i]:
                items[i].append(torch.tensor(text[i], dtype=torch.long))
        return items
    finally:
        model.train(was_training)


def _sample_span(model: Model, cache: KVCache, docs: list, m, shape, gen: torch.Generator, sampler: str,
                 num_inference_steps: int, cfg_scale: float, eta: float, add_bos: bool, progress: bool):
    """Sample one span of modality ``m`` for each of ``docs`` (their prefixes ending in BOI are cached)."""
    config, schedule = model.config, model.schedule
    device = model.output.weight.device
    n, P, G = m.num_patches(shape), m.patch_dim, len(docs)
    guided = cfg_scale != 1.0
    uncond = []
    if guided:
        # The unconditional twins: [BOS, BOI], prefilled once, then the same span rows.
        prefix = torch.tensor(([config.bos_id] if add_bos else []) + [config.boi_of(m)])
        uncond = [cache.new_doc() for _ in docs]
        twin = _Forward(model, cache, uncond, [(prefix, []) for _ in uncond])
        twin()
        twin.commit()
    span_chunk = (torch.full((n,), config.pad_id), [(0, m, shape)])
    step = _Forward(model, cache, docs + uncond, [span_chunk] * (G + len(uncond)))
    rows = step.rows[m.name]

    timesteps = sorted({int(t) for t in ops.inference_timesteps(config.diffusion_steps, num_inference_steps)},
                       reverse=True)
    x = torch.randn(G * n, P, generator=gen).to(device)
    step_fn = ops.ddim_step if sampler == "ddim" else ops.ddpm_step
    extra = {"eta": eta} if sampler == "ddim" else {}
    bar = tqdm(total=len(timesteps), disable=not progress, desc=f"diffusion[{m.name}]", leave=False)
    for k, t in enumerate(timesteps):
        t_prev = timesteps[k + 1] if k + 1 < len(timesteps) else -1
        x_in = torch.cat([x, x]) if guided else x
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.long, device=device)
        out = model.decode_spans(step({m.name: (x_in, t_in)}), m.name, rows).float()
        # Step noise is drawn on the device by the op (Philox) from a seed of our generator.
        step_seed = int(torch.randint(0, 2**62, (), generator=gen))
        x = step_fn(x, out[:G * n], torch.full((G * n,), t, dtype=torch.long, device=device),
                    torch.full((G * n,), t_prev, dtype=torch.long, device=device), schedule,
                    prediction=config.prediction, uncond_out=out[G * n:] if guided else None,
                    cfg_scale=cfg_scale, seed=step_seed, **extra)
        bar.update(1)
    bar.close()

    # Later text attends to the clean span (timestep 0), as in training.
    clean = _Forward(model, cache, docs, [span_chunk] * G)
    clean({m.name: (x, torch.zeros(G * n, dtype=torch.long, device=device))})
    clean.commit()
    for doc in uncond:
        cache.drop(doc)
    return [from_patches(m, x[g * n:(g + 1) * n].float().cpu(), shape) for g in range(G)]
