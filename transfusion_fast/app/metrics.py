"""The package's own evaluation of generated digits and time series, and the PNG pictures.

Digits (:class:`DigitClassifier`): a small MLP trained on the real training digits (8×8) labels
generated images. *Conditional accuracy* is the share of images generated for caption "… seven"
that it labels 7; *captioning accuracy* the share of held-out images whose generated caption names
the right digit; the *Fréchet distance* compares real and generated images through the mean and
covariance of the MLP's hidden features (FID's formula in a feature space fit for 8×8 digits).

Time series (TimeGAN / TransFusion protocol, Yoon et al. 2019, Sikder et al. 2023):
*LDS* = |accuracy − 0.5| of a post-hoc GRU classifier real-vs-synthetic, trained on 80% of each
and scored on the other 20%; *LPS* = MAE on real data of a GRU that predicts the next frame (every
feature, one step ahead) trained on synthetic data, compared with the same predictor trained on
real data. Windows are in [0, 1].

PNG files are written by a small zlib writer (no plotting library needed).
"""
from __future__ import annotations

import functools
import struct
import zlib

import numpy as np
import torch

from ..checks import MAX_SIZE, check_int
from .data import label_from_caption, load_digits_data

__all__ = ["DigitClassifier", "digit_classifier", "conditional_accuracy", "captioning_accuracy",
           "frechet_distance",
           "discriminative_score", "predictive_score", "write_png", "digit_grid_png", "pca_png"]


# ----------------------------------------------------------------------------------------- digits
def _as_8x8_rows(images) -> np.ndarray:
    """``(N, 64)`` float64 in [-1, 1] from images ``(N, [1,] S, S)`` with S = 8 or 16 (average-pooled)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3] or x.shape[2] % 8:
        raise ValueError(f"images must be (N, 1, S, S) or (N, S, S) with S a multiple of 8, got "
                         f"{tuple(x.shape)}")
    if x.shape[2] != 8:
        x = torch.nn.functional.avg_pool2d(x, x.shape[2] // 8)
    return x.clamp(-1.0, 1.0).reshape(x.shape[0], 64).double().numpy()


class DigitClassifier:
    """An MLP (64 → hidden → 10, ReLU) fit on real digit images; labels and embeds images."""

    def __init__(self, hidden: int = 128, seed: int = 0):
        # scikit-learn is the optional "demo" extra: imported where it is needed
        from sklearn.neural_network import MLPClassifier

        self.model = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=600,
                                   random_state=seed)

    def fit(self, images, labels) -> "DigitClassifier":
        self.model.fit(_as_8x8_rows(images), np.asarray(labels))
        return self

    def predict(self, images) -> np.ndarray:
        return self.model.predict(_as_8x8_rows(images))

    def accuracy(self, images, labels) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))

    def features(self, images) -> np.ndarray:
        """The hidden-layer activations: the space the Fréchet distance is measured in."""
        x = _as_8x8_rows(images)
        return np.maximum(x @ self.model.coefs_[0] + self.model.intercepts_[0], 0.0)


@functools.lru_cache(maxsize=4)
def digit_classifier(seed: int = 0) -> DigitClassifier:
    """The eval classifier, fit once per process on the training split (``seed``) of the 8×8
    digits: the same images whatever size the model generates, since 16×16 images are pooled."""
    digits = load_digits_data(8, seed=seed)
    return DigitClassifier(seed=seed).fit(digits.train_images, digits.train_labels)


def conditional_accuracy(classifier: DigitClassifier, generated_images, requested_labels) -> float:
    """Share of generated images that ``classifier`` labels as the digit their caption asked for."""
    requested = np.asarray(requested_labels)
    if len(requested) != len(generated_images):
        raise ValueError(f"requested_labels must have one entry per image ({len(generated_images)}), "
                         f"got {len(requested)}")
    return classifier.accuracy(generated_images, requested)


def captioning_accuracy(captions, true_labels) -> float:
    """Share of captions that name exactly the true digit (see ``data.label_from_caption``)."""
    true_labels = list(np.asarray(true_labels).tolist())
    if len(captions) != len(true_labels):
        raise ValueError(f"captions ({len(captions)}) and true_labels ({len(true_labels)}) must have "
                         f"the same length")
    return float(np.mean([label_from_caption(c) == y for c, y in zip(captions, true_labels)]))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½): the Fréchet distance of two Gaussians fit
    to the rows of each feature matrix (symmetric square roots by eigendecomposition)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"features must be 2-D with equal widths and >= 2 rows, got {a.shape} and "
                         f"{b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def sqrt_psd(m):
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root_a = sqrt_psd(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


# ------------------------------------------------------------------------------------ time series
class _GRUHead(torch.nn.Module):
    """A one-layer GRU with a linear head: per step ``(B, L, out_features)`` when
    ``out_features`` is given, else one logit per sequence ``(B,)`` from the last state."""

    def __init__(self, features: int, hidden: int, out_features: int | None = None):
        super().__init__()
        self.gru = torch.nn.GRU(features, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, out_features or 1)
        self.per_step = out_features is not None

    def forward(self, x):
        out, last = self.gru(x)
        return torch.sigmoid(self.head(out)) if self.per_step else self.head(last[-1]).squeeze(-1)


def _check_windows(name: str, x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if t.dim() != 3 or t.shape[0] < 2 or t.shape[1] < 2:
        raise ValueError(f"{name} must be (num_windows >= 2, length >= 2, features), got {tuple(t.shape)}")
    return t


def _train(model, loss_fn, inputs, targets, iterations, batch_size, seed):
    # An untrained network would score as if the data were perfect (LDS 0): no zero-iteration run.
    check_int("iterations", iterations, 1, MAX_SIZE)
    check_int("batch_size", batch_size, 1, MAX_SIZE)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(iterations):
        idx = torch.randint(0, inputs.shape[0], (min(batch_size, inputs.shape[0]),), generator=generator)
        optimizer.zero_grad()
        loss_fn(model(inputs[idx]), targets[idx]).backward()
        optimizer.step()
    return model


def discriminative_score(real, synthetic, iterations: int = 2000, hidden: int | None = None,
                         batch_size: int = 128, seed: int = 0) -> float:
    """LDS: |held-out accuracy − 0.5| of a GRU classifier trained to tell real from synthetic
    windows ``(N, L, F)`` (both sets cut to the smaller size, 80/20 split of each).
    0 = indistinguishable, 0.5 = fully separable.
    ``hidden`` defaults to max(F // 2, 1), TimeGAN's choice."""
    real, synthetic = _check_windows("real", real), _check_windows("synthetic", synthetic)
    if real.shape[1:] != synthetic.shape[1:]:
        raise ValueError(f"real and synthetic windows must have the same (length, features), got "
                         f"{tuple(real.shape[1:])} and {tuple(synthetic.shape[1:])}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    # Equal class sizes, so that always answering the larger class scores 0.5, not better.
    count = min(real.shape[0], synthetic.shape[0])
    parts = []
    for x in (real, synthetic):
        order = torch.from_numpy(rng.permutation(x.shape[0])[:count])
        n_train = max(1, int(0.8 * count))
        parts.append((x[order[:n_train]], x[order[n_train:]]))
    (real_train, real_test), (syn_train, syn_test) = parts
    inputs = torch.cat([real_train, syn_train])
    targets = torch.cat([torch.ones(len(real_train)), torch.zeros(len(syn_train))])
    model = _GRUHead(real.shape[2], hidden or max(real.shape[2] // 2, 1))
    with torch.enable_grad():
        _train(model, torch.nn.functional.binary_cross_entropy_with_logits, inputs, targets,
               iterations, batch_size, seed)
    with torch.no_grad():
        correct = (model(real_test) > 0).sum() + (model(syn_test) <= 0).sum()
    accuracy = float(correct) / (len(real_test) + len(syn_test))
    return abs(accuracy - 0.5)


def predictive_score(train_windows, test_windows, iterations: int = 2000, hidden: int | None = None,
                     batch_size: int = 128, seed: int = 0) -> float:
    """LPS: MAE on ``test_windows`` (real) of a GRU trained on ``train_windows`` to predict every
    feature at step t+1 from all features up to step t. Train on synthetic data for the score, on
    real training data for the reference value. (TimeGAN predicts only the last feature from the
    others; on the sine set the features are independent, so that target carries no signal and
    every generator would score alike: this predictor sees each feature's own past.)
    ``hidden`` defaults to max(F // 2, 1), TimeGAN's choice."""
    train = _check_windows("train_windows", train_windows)
    test = _check_windows("test_windows", test_windows)
    if train.shape[2] != test.shape[2]:
        raise ValueError(f"train and test windows must have the same number of features, got "
                         f"{train.shape[2]} and {test.shape[2]}")
    features = train.shape[2]
    torch.manual_seed(seed)
    model = _GRUHead(features, hidden or max(features // 2, 1), out_features=features)
    with torch.enable_grad():
        _train(model, lambda p, y: (p - y).abs().mean(), train[:, :-1], train[:, 1:],
               iterations, batch_size, seed)
    with torch.no_grad():
        return float((model(test[:, :-1]) - test[:, 1:]).abs().mean())


# ------------------------------------------------------------------------------------------ PNGs
def write_png(path: str, pixels: np.ndarray) -> None:
    """Write ``pixels`` (H, W) gray or (H, W, 3) RGB, uint8, as an 8-bit PNG."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"pixels must be uint8 (H, W) or (H, W, 3), got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    color_type = 0 if pixels.ndim == 2 else 2
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                     + chunk(b"IEND", b""))


def digit_grid_png(path: str, images, rows: int, scale: int = 4, gap: int = 1) -> None:
    """A grid of images in [-1, 1] ``(rows * cols, 1, S, S)``, row-major, white ink on black."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.dim() == 4:
        x = x[:, 0]
    if x.dim() != 3 or x.shape[0] % rows:
        raise ValueError(f"images must be (rows * cols, [1,] S, S) with rows={rows}, got {tuple(x.shape)}")
    cols, size = x.shape[0] // rows, x.shape[-1]
    cell = size * scale + gap
    canvas = np.full((rows * cell + gap, cols * cell + gap), 64, dtype=np.uint8)
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(x.shape[0]):
        r, c = divmod(i, cols)
        big = np.kron(pixels[i], np.ones((scale, scale), dtype=np.uint8))
        top, left = gap + r * cell, gap + c * cell
        canvas[top:top + size * scale, left:left + size * scale] = big
    write_png(path, canvas)


def pca_png(path: str, real: np.ndarray, synthetic: np.ndarray, size: int = 400) -> None:
    """TimeGAN's PCA picture: each window averaged over features to an L-vector, both sets
    projected on the 2 principal axes of the real set; real in red, synthetic in blue."""
    real_vec = np.asarray(real, np.float64).mean(axis=2)
    syn_vec = np.asarray(synthetic, np.float64).mean(axis=2)
    mean = real_vec.mean(0)
    _, _, vt = np.linalg.svd(real_vec - mean, full_matrices=False)
    axes = vt[:2].T
    points = [(real_vec - mean) @ axes, (syn_vec - mean) @ axes]
    both = np.concatenate(points)
    low, high = both.min(0), both.max(0)
    span = np.where(high > low, high - low, 1.0)
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    margin = 10
    for pts, color in zip(points, ((220, 40, 40), (40, 80, 220))):
        xy = ((pts - low) / span * (size - 2 * margin - 3) + margin).astype(int)
        for x, y in xy:
            canvas[size - 1 - y - 3: size - 1 - y, x: x + 3] = color
    write_png(path, canvas)
