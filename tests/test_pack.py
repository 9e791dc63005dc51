"""transfusion_fast.pack: document structure, layout, targets, noise, determinism, bad input."""
import pytest
import torch

import transfusion_fast as tf
from transfusion_fast import ModalityConfig, ModelConfig, pack
from transfusion_fast.config import IGNORE_INDEX
from transfusion_fast.testing import IMAGE, SERIES, BOS, EOS, BOI, EOI

CONFIG = ModelConfig(dim=32, depth=1, n_heads=2, modalities=(IMAGE, SERIES), max_seq_len=64)
PAD = 0


pytestmark = pytest.mark.usefixtures("reference_backend")


def test_document_structure_layout_and_targets():
    image = torch.arange(16.0).reshape(1, 4, 4)
    series = torch.randn(8, 3)
    batch = pack([[torch.tensor([1, 2]), image, torch.tensor([3])], [series]], CONFIG, seed=0,
                 cfg_drop_prob=0.0)
    doc0 = [BOS, 1, 2, BOI, PAD, PAD, PAD, PAD, EOI, 3, EOS]
    doc1 = [BOS, 250, PAD, PAD, 251, EOS]
    assert batch.tokens.tolist() == doc0 + doc1
    assert batch.layout.cu_seqlens.tolist() == [0, 11, 17]
    assert batch.layout.spans.tolist() == [[4, 8], [13, 15]]
    assert batch.sample_lengths == [11, 6]
    # Text predicts text (BOI and EOI included); no target into or inside a span, none at doc ends.
    expected = [1, 2, BOI, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3, EOS,
                IGNORE_INDEX, 250, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, EOS, IGNORE_INDEX]
    assert batch.targets.tolist() == expected
    assert batch.loss_rows.tolist() == [i for i, t in enumerate(expected) if t != IGNORE_INDEX]
    # Positions restart per document; spans hold their patches in row order.
    assert batch.positions.tolist() == list(range(11)) + list(range(6))
    img = batch.spans["image"]
    assert img.rows.tolist() == [4, 5, 6, 7]
    torch.testing.assert_close(img.x0, tf.ops.patchify(image[None], 2)[0])
    ser = batch.spans["series"]
    assert ser.rows.tolist() == [13, 14] and ser.span_index.tolist() == [1, 1]
    torch.testing.assert_close(ser.x0, series.reshape(2, 12))
    assert batch.span_sizes.tolist() == [4.0, 2.0]
    assert batch.span_shapes == [("image", (1, 4, 4), 0), ("series", (8, 3), 1)]


def test_spans_are_noised_at_their_own_timestep():
    samples = [[torch.randn(1, 4, 4)], [torch.randn(1, 2, 2), torch.tensor([5])]]
    batch = pack(samples, CONFIG, seed=3, timesteps=[100, 900])
    s = batch.spans["image"]
    assert s.timesteps.tolist() == [100] * 4 + [900]
    schedule = tf.get_schedule("cosine", 1000)
    expected, _ = tf.ops.add_noise(s.x0, s.timesteps, schedule, s.noise)
    torch.testing.assert_close(s.x_t, expected)
    assert not torch.allclose(s.x_t, s.x0)


def test_seeded_and_deterministic():
    samples = [[torch.tensor([1, 2]), torch.randn(1, 4, 4)], [torch.randn(16, 3), torch.tensor([4])]]
    a, b, c = (pack(samples, CONFIG, seed=s) for s in (7, 7, 8))
    for name in a.spans:
        assert torch.equal(a.spans[name].x_t, b.spans[name].x_t)
        assert torch.equal(a.span_timesteps, b.span_timesteps)
    assert not torch.equal(a.spans["image"].noise, c.spans["image"].noise)


def test_captioned_spans_get_cleaner_timesteps():
    """A span followed by text draws t <= caption_max_timestep (probability 1 here)."""
    samples = [[torch.randn(1, 2, 2), torch.tensor([5])] for _ in range(20)]
    batch = pack(samples, CONFIG, seed=0, caption_noise_prob=1.0, caption_max_timestep=300)
    assert int(batch.span_timesteps.max()) <= 300
    free = pack([[torch.tensor([5]), torch.randn(1, 2, 2)] for _ in range(20)], CONFIG, seed=0,
                caption_noise_prob=1.0, caption_max_timestep=300)
    assert int(free.span_timesteps.max()) > 300


def test_default_caption_bound_is_half_the_schedule_for_any_number_of_steps():
    """The default bound is T // 2 (500 of 1000, the paper's): a config with T <= 500 packs with the
    defaults (a fixed default of 500 was out of its range and refused every call)."""
    short = ModelConfig(**{**CONFIG.to_dict(), "modalities": (IMAGE, SERIES), "diffusion_steps": 100})
    samples = [[torch.randn(1, 2, 2), torch.tensor([5])] for _ in range(20)]
    batch = pack(samples, short, seed=0, caption_noise_prob=1.0)
    assert 0 <= int(batch.span_timesteps.max()) <= 50
    assert int(pack(samples, CONFIG, seed=0, caption_noise_prob=1.0).span_timesteps.max()) <= 500


def test_cfg_drop_removes_the_prefix_before_the_first_span():
    sample = [torch.tensor([1, 2, 3]), torch.randn(1, 2, 2), torch.tensor([4])]
    dropped = pack([sample], CONFIG, seed=0, cfg_drop_prob=1.0)
    assert dropped.tokens.tolist() == [BOS, BOI, PAD, EOI, 4, EOS]
    kept = pack([sample], CONFIG, seed=0, cfg_drop_prob=0.0)
    assert kept.tokens.tolist() == [BOS, 1, 2, 3, BOI, PAD, EOI, 4, EOS]


def test_axial_positions_for_image_patches():
    config = ModelConfig(dim=32, depth=1, n_heads=2, modalities=(IMAGE, SERIES), span_positions="axial")
    batch = pack([[torch.tensor([1]), torch.randn(1, 4, 6), torch.randn(4, 3)]], config, cfg_drop_prob=0.0)
    # BOS 1 BOI [6 patches at offset 3: 2 rows x 3 columns] EOI BOI' [1 patch] EOI' EOS
    pos, axial = batch.positions.tolist(), batch.axial.tolist()
    assert pos[3:9] == [[3, 3], [3, 4], [3, 5], [4, 3], [4, 4], [4, 5]]
    assert axial == [False] * 3 + [True] * 6 + [False] * 5
    assert pos[:3] == [[0, 0], [1, 1], [2, 2]] and pos[11] == [11, 11]


def test_explicit_modality_tuple():
    config = ModelConfig(dim=32, depth=1, n_heads=2,
                         modalities=(IMAGE, ModalityConfig("mask", "image", channels=1, patch_size=4,
                                                           max_size=8, boi_id=250, eoi_id=251)))
    batch = pack([[("mask", torch.randn(1, 4, 4))]], config)
    assert batch.tokens.tolist()[:2] == [BOS, 250] and list(batch.spans) == ["mask"]
    with pytest.raises(ValueError, match="cannot tell which image modality"):
        pack([[torch.randn(1, 4, 4)]], config)


@pytest.mark.parametrize("samples, words", [
    ([[torch.tensor([1, 300])]], ["samples[0][0]", "vocab_size=260", "300"]),
    ([[torch.tensor([-1])]], ["samples[0][0]", "-1"]),
    ([[torch.randn(3, 4, 4)]], ["samples[0][0]", "1 channels", "got 3"]),
    ([[torch.randn(1, 4, 5)]], ["samples[0][0]", "width", "patch size 2", "got 5"]),
    ([[torch.randn(1, 16, 16)]], ["height", "max_size=8", "got 16"]),
    ([[torch.randn(6, 3)]], ["series", "multiple of the patch size 4", "6 frames"]),
    ([[torch.randn(8, 2)]], ["3 features", "got 2"]),
    ([[torch.tensor([1])], []], ["samples[1]", "empty"]),
    ([[torch.tensor([], dtype=torch.long)]], ["samples[0]", "empty"]),
    ([[torch.tensor([[1, 2]])]], ["samples[0][0]", "1-D integer"]),
    ([[torch.full((1, 4, 4), float("nan"))]], ["samples[0][0]", "NaN"]),
    ([[torch.arange(70)]], ["samples[0]", "72 tokens", "max_seq_len=64"]),
    ([], ["samples", "empty"]),
])
def test_bad_input_names_argument_expected_and_received(samples, words):
    with pytest.raises((ValueError, TypeError)) as info:
        pack(samples, CONFIG)
    for word in words:
        assert word in str(info.value)


def test_bad_options():
    with pytest.raises(ValueError, match=r"timesteps\[0\] must be an int in \[0, 999\], got int 1000"):
        pack([[torch.randn(1, 2, 2)]], CONFIG, timesteps=[1000])
    with pytest.raises(ValueError, match=r"timesteps must give one value in \[0, 1000\) per span \(1 spans\)"):
        pack([[torch.randn(1, 2, 2)]], CONFIG, timesteps=[1, 2])
    with pytest.raises(ValueError, match="cfg_drop_prob"):
        pack([[torch.tensor([1])]], CONFIG, cfg_drop_prob=2.0)
