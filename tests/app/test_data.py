"""Data of the main job: shapes, ranges, the fixed split, captions, sine and CSV windows."""
import numpy as np
import pytest
import torch

from transfusion_fast.app import data


@pytest.fixture(scope="module")
def digits8():
    return data.load_digits_data(8)


def test_digits_shapes_ranges_and_split(digits8):
    d = digits8
    assert d.train_images.shape[1:] == (1, 8, 8) and d.test_images.shape[1:] == (1, 8, 8)
    assert len(d.train_images) + len(d.test_images) == 1797
    assert abs(len(d.test_images) / 1797 - 0.2) < 0.01
    assert float(d.train_images.min()) == -1.0 and float(d.train_images.max()) == 1.0
    assert sorted(d.test_labels.unique().tolist()) == list(range(10))     # stratified
    again = data.load_digits_data(8)
    assert torch.equal(again.test_images, d.test_images)                  # fixed split


def test_digits_upsampled():
    d = data.load_digits_data(16)
    assert d.train_images.shape[1:] == (1, 16, 16)
    assert float(d.train_images.min()) >= -1.0 and float(d.train_images.max()) <= 1.0


def test_captions_name_their_digit():
    import random

    rng = random.Random(0)
    for label in range(10):
        assert data.caption_for(label) == f"a handwritten {data.DIGIT_WORDS[label]}"
        for _ in range(10):
            assert data.label_from_caption(data.caption_for(label, rng)) == label
    assert data.label_from_caption("a handwritten") is None
    assert data.label_from_caption("a three or a 4") is None
    with pytest.raises(ValueError, match="label must be a digit 0-9, got 10"):
        data.caption_for(10)


def test_sine_windows():
    x = data.sine_windows(50, 24, 5, seed=1)
    assert x.shape == (50, 24, 5) and x.dtype == np.float32
    assert x.min() == pytest.approx(0.0, abs=1e-6) and x.max() == pytest.approx(1.0, abs=1e-6)
    assert np.array_equal(x, data.sine_windows(50, 24, 5, seed=1))
    with pytest.raises(ValueError, match="length must be a positive int, got 0"):
        data.sine_windows(5, 0)


def test_csv_windows(tmp_path):
    path = tmp_path / "prices.csv"
    rows = ["date,open,close"] + [f"2024-01-{i + 1:02d},{10 + i},{20 - i}" for i in range(20)]
    path.write_text("\n".join(rows) + "\n")
    windows, scaler = data.csv_windows(str(path), 5)
    assert windows.shape == (16, 5, 2)                 # the date column is skipped
    assert windows.min() == 0.0 and windows.max() == 1.0
    np.testing.assert_allclose(scaler.inverse(windows[0])[:, 0], [10, 11, 12, 13, 14], atol=1e-5)
    train, test = data.split_windows(windows)
    assert len(train) + len(test) == 16 and len(test) == 3
    with pytest.raises(ValueError, match=r"prices.csv' has 20 data rows: windows of --length 12 need at least 21"):
        data.csv_windows(str(path), 12)


def test_model_range_round_trip():
    x = np.linspace(0, 1, 11)
    np.testing.assert_allclose(data.from_model_range(data.to_model_range(x)), x)
    assert data.to_model_range(0.0) == -1.0 and data.to_model_range(1.0) == 1.0
