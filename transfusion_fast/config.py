"""The configuration of a Transfusion model: :class:`ModelConfig` and its :class:`ModalityConfig`.

Frozen dataclasses, validated on construction (``ValueError`` naming the field, the expected and the
received value), JSON round trip for checkpoints. Shared by the model, :func:`~transfusion_fast.pack`,
generation and checkpoints; it holds no tensors and imports no module above the ops.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .checks import MAX_SIZE, check_bool, check_float, check_int, describe
from .ops.attention import SUPPORTED_HEAD_DIMS
from .ops.validation import PREDICTIONS
from .schedules import MAX_DIFFUSION_STEPS, SCHEDULES

__all__ = ["ModalityConfig", "ModelConfig", "IGNORE_INDEX", "PREDICTIONS", "CONDITIONINGS", "SPAN_POSITIONS",
           "MODALITY_KINDS"]

#: target id of rows without a next-token loss (F.cross_entropy's default ignore_index)
IGNORE_INDEX = -100
CONDITIONINGS = ("patch_add", "adaln_zero")
SPAN_POSITIONS = ("sequential", "axial")
MODALITY_KINDS = ("image", "sequence")


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


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


def _modality(m) -> "ModalityConfig":
    if isinstance(m, dict):
        unknown = sorted(set(m) - {f.name for f in dataclasses.fields(ModalityConfig)})
        if unknown:
            raise ValueError(f"ModelConfig.modalities: unknown ModalityConfig fields {unknown}")
        return ModalityConfig(**m)
    return m


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
    # Training-time memory settings (they change no result: gradients equal the plain run).
    activation_checkpointing: bool = False  # each block recomputes its activations in the backward

    def __post_init__(self):
        if not isinstance(self.modalities, (tuple, list)):
            raise ValueError(f"ModelConfig.modalities must be a tuple of ModalityConfig (or dicts), got "
                             f"{describe(self.modalities)}")
        object.__setattr__(self, "modalities", tuple(_modality(m) for m in self.modalities))
        check_int("ModelConfig.n_heads", self.n_heads, 1, MAX_SIZE)
        check_int("ModelConfig.dim", self.dim, 1, MAX_SIZE)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, the expected and the received value."""
        def positive_int(name, high=MAX_SIZE):
            check_int(f"ModelConfig.{name}", getattr(self, name), 1, high)
        for name in ("vocab_size", "dim", "depth", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_multiple_of", "max_seq_len", "time_freq_dim"):
            positive_int(name)
        positive_int("diffusion_steps", MAX_DIFFUSION_STEPS)
        if self.ffn_hidden_size is not None:
            positive_int("ffn_hidden_size")
        check_bool("ModelConfig.qkv_bias", self.qkv_bias)
        check_bool("ModelConfig.activation_checkpointing", self.activation_checkpointing)
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
            _require(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < self.vocab_size,
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
        check_float("ModelConfig.norm_eps", self.norm_eps, 0.0, low_open=True)
        check_float("ModelConfig.rope_theta", self.rope_theta, 0.0, low_open=True)
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
        check_float("ModelConfig.diffusion_loss_weight", self.diffusion_loss_weight, 0.0)
        check_float("ModelConfig.cfg_drop_prob", self.cfg_drop_prob, 0.0, 1.0)
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
                check_int(f"modality {m.name!r}: {attr}", getattr(m, attr), 1, MAX_SIZE)
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
        if not isinstance(d, dict):
            raise ValueError(f"ModelConfig.from_dict needs a dict, got {describe(d)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown fields {unknown}; expected a subset of {sorted(known)}")
        d = dict(d)
        if "modalities" in d and isinstance(d["modalities"], (list, tuple)):
            d["modalities"] = tuple(_modality(m) for m in d["modalities"])
        return cls(**d)
