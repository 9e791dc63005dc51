"""The metric code on synthetic cases whose answer is known."""
import struct
import zlib

import numpy as np
import pytest
import torch

from transfusion_fast.app import data, metrics


@pytest.fixture(scope="module")
def digits():
    return data.load_digits_data(8)


@pytest.fixture(scope="module")
def classifier(digits):
    return metrics.digit_classifier(0)


def test_classifier_is_accurate_on_held_out_digits(digits, classifier):
    assert classifier.accuracy(digits.test_images, digits.test_labels) > 0.93


def test_perfect_generator_scores_the_classifier_accuracy(digits, classifier):
    # A generator that returns real held-out images of the requested digit.
    acc = metrics.conditional_accuracy(classifier, digits.test_images, digits.test_labels)
    assert acc == classifier.accuracy(digits.test_images, digits.test_labels)
    # The same images at 16x16 (nearest upsampling) are pooled back to 8x8: same score.
    big = digits.test_images.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert metrics.conditional_accuracy(classifier, big, digits.test_labels) == acc
    # Asking for the wrong digit scores near zero.
    wrong = (digits.test_labels + 1) % 10
    assert metrics.conditional_accuracy(classifier, digits.test_images, wrong) < 0.1


def test_captioning_accuracy():
    assert metrics.captioning_accuracy(["a handwritten seven", "the digit 3", "a two", "garbage"],
                                       [7, 3, 1, 0]) == 0.5
    with pytest.raises(ValueError, match="same length"):
        metrics.captioning_accuracy(["a one"], [1, 2])


def test_frechet_distance_known_values(digits, classifier):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # Same covariance, mean shifted by 2 in every one of 3 dimensions: distance = 3 * 2^2.
    assert metrics.frechet_distance(a, a + 2.0) == pytest.approx(12.0, abs=1e-6)
    # Covariances I and 4I in 3-D: Tr(I + 4I - 2*2I) = 3.
    assert metrics.frechet_distance(a, 2.0 * a) == pytest.approx(3.0, rel=0.05)
    # Real digits are much closer to real digits than noise is.
    real = classifier.features(digits.test_images)
    same = metrics.frechet_distance(real, classifier.features(digits.train_images))
    noise = metrics.frechet_distance(real, classifier.features(torch.rand(300, 1, 8, 8) * 2 - 1))
    assert noise > 20 * same


def _sine(n, seed, length=16):
    return data.sine_windows(n, length, 3, seed=seed)


def test_lds_identical_distributions_is_near_zero():
    lds = metrics.discriminative_score(_sine(300, 1), _sine(300, 2), iterations=150, hidden=8)
    assert lds <= 0.1


def test_lds_disjoint_distributions_is_near_half():
    real = _sine(300, 1) * 0.5                    # values in [0, 0.5]
    fake = 0.5 + _sine(300, 2) * 0.5              # values in [0.5, 1]
    lds = metrics.discriminative_score(real, fake, iterations=150, hidden=8)
    assert lds >= 0.45


def test_lds_balances_unequal_set_sizes():
    # A classifier that answers "real" to everything must not score above chance.
    lds = metrics.discriminative_score(_sine(400, 1), _sine(100, 2), iterations=50, hidden=8)
    assert lds <= 0.1


def test_lps_matches_for_identical_training_data():
    train, test = _sine(300, 1), _sine(100, 3)
    same = metrics.predictive_score(train, test, iterations=150, hidden=8)
    assert metrics.predictive_score(train.copy(), test, iterations=150, hidden=8) == same
    other = metrics.predictive_score(_sine(300, 2), test, iterations=150, hidden=8)
    assert other == pytest.approx(same, rel=0.15)
    # Trained on unrelated data (constants), the predictor is clearly worse on real windows.
    junk = np.full_like(train, 0.9)
    assert metrics.predictive_score(junk, test, iterations=150, hidden=8) > 1.5 * same


def test_metric_inputs_are_validated():
    with pytest.raises(ValueError, match=r"windows must have the same \(length, features\)"):
        metrics.discriminative_score(_sine(10, 1), _sine(10, 1, length=12), iterations=1)
    with pytest.raises(ValueError, match="real must be"):
        metrics.discriminative_score(np.zeros((5, 4)), _sine(10, 1), iterations=1)
    with pytest.raises(ValueError, match="requested_labels must have one entry per image"):
        metrics.conditional_accuracy(None, torch.zeros(3, 1, 8, 8), [1, 2])


def _read_png(path):
    blob = open(path, "rb").read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos:pos + 4])
        kind, body = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", blob[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = 1 if color == 0 else 3
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + width * channels)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(height, width, channels)


def test_png_writer_round_trip(tmp_path):
    pixels = np.arange(12 * 7 * 3, dtype=np.uint8).reshape(12, 7, 3)
    metrics.write_png(str(tmp_path / "rgb.png"), pixels)
    assert np.array_equal(_read_png(str(tmp_path / "rgb.png")), pixels)
    with pytest.raises(ValueError, match="pixels must be uint8"):
        metrics.write_png(str(tmp_path / "bad.png"), pixels.astype(np.float32))


def test_digit_grid_and_pca_pictures(tmp_path, digits):
    metrics.digit_grid_png(str(tmp_path / "grid.png"), digits.test_images[:20], rows=2, scale=2, gap=1)
    grid = _read_png(str(tmp_path / "grid.png"))
    assert grid.shape == (2 * 17 + 1, 10 * 17 + 1, 1)
    first = ((digits.test_images[0, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(grid[1:17:2, 1:17:2, 0], first)
    metrics.pca_png(str(tmp_path / "pca.png"), _sine(50, 1), _sine(50, 2), size=100)
    pca = _read_png(str(tmp_path / "pca.png"))
    red = ((pca == [220, 40, 40]).all(-1)).sum()
    blue = ((pca == [40, 80, 220]).all(-1)).sum()
    assert pca.shape == (100, 100, 3) and red > 0 and blue > 0
