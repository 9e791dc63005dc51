"""The data of the main job, all available offline.

* Digits: scikit-learn's bundled 8×8 handwritten digits (1,797 images), optionally upsampled to
  16×16, scaled to [-1, 1], with short captions ("a handwritten seven", with variation). A fixed,
  stratified held-out split (seeded) is never used for training.
* Sine: the standard TimeGAN sine benchmark, F features each sin(f·t + φ) with f, φ ~ U(0, 0.1)
  per sample and feature, min-max scaled to [0, 1].
* CSV: any numeric table (rows = time), min-max scaled per column, cut into sliding windows.

Time-series windows are kept in [0, 1] (the space the LDS/LPS metrics use);
:func:`to_model_range` / :func:`from_model_range` map them to and from the model's [-1, 1].
"""
from __future__ import annotations

import csv
import dataclasses
import random

import numpy as np
import torch

__all__ = ["DIGIT_WORDS", "CAPTION_TEMPLATES", "DigitsData", "load_digits_data", "caption_for",
           "label_from_caption", "MinMaxScaler", "sine_windows", "csv_windows", "sliding_windows",
           "split_windows", "to_model_range", "from_model_range", "MIN_WINDOWS"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Variation in the caption-to-image direction; image-to-caption trains on the first (canonical) one
# so captioning has a single right answer per digit.
CAPTION_TEMPLATES = ("a handwritten {w}", "the digit {w}", "a {w}", "handwritten {w}",
                     "an image of a {w}", "the number {d}", "digit {d}")


def caption_for(label: int, rng: random.Random | None = None) -> str:
    """The canonical caption of ``label`` ("a handwritten seven"), or a random variant with ``rng``."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"label must be a digit 0-9, got {label!r}")
    template = CAPTION_TEMPLATES[0] if rng is None else rng.choice(CAPTION_TEMPLATES)
    return template.format(w=DIGIT_WORDS[int(label)], d=int(label))


def label_from_caption(text: str) -> int | None:
    """The digit a caption names (a number word or a decimal digit), or None if it names none or
    several different ones."""
    found = set()
    for word in text.lower().replace(",", " ").replace(".", " ").split():
        if word in DIGIT_WORDS:
            found.add(DIGIT_WORDS.index(word))
        elif len(word) == 1 and word.isdigit():
            found.add(int(word))
    return found.pop() if len(found) == 1 else None


@dataclasses.dataclass
class DigitsData:
    """Images ``(N, 1, S, S)`` float32 in [-1, 1] and labels ``(N,)`` int64, split train/held-out.

    ``train_images_8x8`` / ``test_images_8x8`` keep the original 8×8 pixels in [-1, 1]: the eval
    classifier works on those.
    """
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    image_size: int

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def load_digits_data(image_size: int = 8, test_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """scikit-learn's digits in [-1, 1] at ``image_size`` (8, or 16 = bilinear upsampling), with a
    fixed stratified held-out split of ``test_fraction`` chosen by ``seed``."""
    if image_size not in (8, 16):
        raise ValueError(f"image_size must be 8 or 16, got {image_size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    # scikit-learn is the optional "demo" extra: imported where it is needed
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> -1..1
    if image_size == 16:
        images = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear",
                                                 align_corners=False).clamp(-1.0, 1.0)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    labels_t = torch.from_numpy(labels)
    return DigitsData(images[train_idx], labels_t[train_idx], images[test_idx], labels_t[test_idx],
                      image_size)


def to_model_range(x):
    """[0, 1] -> [-1, 1]."""
    return x * 2.0 - 1.0


def from_model_range(x):
    """[-1, 1] -> [0, 1]."""
    return (x + 1.0) * 0.5


class MinMaxScaler:
    """Per-feature min-max scaling to [0, 1], fitted on the training data only."""

    def __init__(self, minimum: np.ndarray, maximum: np.ndarray):
        self.minimum = np.asarray(minimum, dtype=np.float64)
        self.maximum = np.asarray(maximum, dtype=np.float64)

    @classmethod
    def fit(cls, data: np.ndarray) -> "MinMaxScaler":
        flat = np.asarray(data, dtype=np.float64).reshape(-1, np.shape(data)[-1])
        return cls(flat.min(axis=0), flat.max(axis=0))

    def transform(self, data: np.ndarray) -> np.ndarray:
        span = np.where(self.maximum > self.minimum, self.maximum - self.minimum, 1.0)
        return ((np.asarray(data, dtype=np.float64) - self.minimum) / span).astype(np.float32)

    def inverse(self, data: np.ndarray) -> np.ndarray:
        return (np.asarray(data, dtype=np.float64) * (self.maximum - self.minimum) + self.minimum
                ).astype(np.float32)


#: Fewest windows a time-series task works with: a training set, and a held-out set of >= 2 windows
#: for the metrics.
MIN_WINDOWS = 10


def sine_windows(num_samples: int, length: int, features: int = 5, seed: int = 0) -> np.ndarray:
    """The TimeGAN sine benchmark: ``(num_samples, length, features)`` float32 in [0, 1].

    Every sample and feature draws its own frequency f and phase φ from U(0, 0.1); the signal
    sin(f·t + φ), t = 0 … length−1, is then min-max scaled over the whole set.
    """
    for name, value in (("num_samples", num_samples), ("length", length), ("features", features)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    rng = np.random.default_rng(seed)
    freq = rng.uniform(0.0, 0.1, size=(num_samples, 1, features))
    phase = rng.uniform(0.0, 0.1, size=(num_samples, 1, features))
    t = np.arange(length, dtype=np.float64).reshape(1, length, 1)
    data = np.sin(freq * t + phase)
    return MinMaxScaler.fit(data).transform(data)


def sliding_windows(series: np.ndarray, length: int, stride: int = 1) -> np.ndarray:
    """All windows ``series[i : i + length]`` for i = 0, stride, …: ``(num_windows, length, F)``."""
    series = np.asarray(series)
    if series.ndim != 2:
        raise ValueError(f"series must be 2-D (time, features), got shape {series.shape}")
    if not isinstance(length, int) or not 1 <= length <= series.shape[0]:
        raise ValueError(f"length must be an int in [1, {series.shape[0]}] (the series length), "
                         f"got {length!r}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    starts = np.arange(0, series.shape[0] - length + 1, stride)
    return np.stack([series[s:s + length] for s in starts]).astype(np.float32)


def read_csv_table(path: str) -> np.ndarray:
    """The numeric columns of a CSV file as ``(rows, columns)`` float64; a header row and
    non-numeric columns (dates, tickers) are skipped. Errors name the file."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except UnicodeDecodeError as error:
        raise ValueError(f"--data {path!r} is not a UTF-8 text file (byte {error.start}: "
                         f"{error.reason}); a CSV file is needed") from None
    except csv.Error as error:
        raise ValueError(f"--data {path!r} is not a readable CSV file: {error}") from None
    if not rows:
        raise ValueError(f"--data {path!r}: the file holds no rows")

    def number(cell):
        try:
            return float(cell)
        except ValueError:
            return None

    body = rows[1:] if all(number(c) is None for c in rows[0] if c.strip()) else rows
    if not body:
        raise ValueError(f"--data {path!r}: the file holds a header row and no data rows")
    width = max(len(r) for r in body)
    numeric_cols = [c for c in range(width)
                    if all(c < len(r) and number(r[c]) is not None for r in body)]
    if not numeric_cols:
        raise ValueError(f"--data {path!r}: no column is numeric in every row")
    table = np.array([[float(r[c]) for c in numeric_cols] for r in body], dtype=np.float64)
    if not np.isfinite(table).all():
        row = int(np.nonzero(~np.isfinite(table).all(axis=1))[0][0])
        raise ValueError(f"--data {path!r}: data row {row} holds NaN or inf")
    return table


def csv_windows(path: str, length: int, stride: int = 1) -> tuple[np.ndarray, MinMaxScaler]:
    """Sliding windows of the CSV at ``path`` (rows = time), each column min-max scaled to [0, 1]
    over the whole file (as in TimeGAN), and the scaler to map samples back to the data's units."""
    table = read_csv_table(path)
    needed = length + (MIN_WINDOWS - 1) * stride
    if table.shape[0] < needed:
        raise ValueError(f"--data {path!r} has {table.shape[0]} data rows: windows of --length {length} need at "
                         f"least {needed} (for {MIN_WINDOWS} windows to split into training and held-out sets)")
    scaler = MinMaxScaler.fit(table)
    return sliding_windows(scaler.transform(table), length, stride), scaler


def split_windows(windows: np.ndarray, test_fraction: float = 0.2, seed: int = 0):
    """A fixed random train/held-out split of the windows (first axis)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    order = np.random.default_rng(seed).permutation(len(windows))
    n_test = max(1, int(round(len(windows) * test_fraction)))
    return windows[order[n_test:]], windows[order[:n_test]]
