"""The byte-level tokenizer: round trips, special tokens, invalid input."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from transfusion_fast.app.tokenizer import BOI, BOS, EOI, EOS, PAD, VOCAB_SIZE, ByteTokenizer


@given(st.text())
def test_round_trip_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == BOS and ids[-1] == EOS
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_are_distinct_and_outside_bytes():
    specials = {BOS, EOS, BOI, EOI, PAD}
    assert len(specials) == 5 and min(specials) >= 256 and max(specials) == VOCAB_SIZE - 1


def test_decode_renders_or_skips_specials():
    tok = ByteTokenizer()
    ids = [BOS] + tok.encode("a seven") + [EOS, PAD]
    assert tok.decode(ids) == "a seven"
    assert tok.decode(ids, skip_special=False) == "<bos>a seven<eos><pad>"


def test_multibyte_text_and_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([0xC3]) == "\ufffd"           # a generated half character must not raise


def test_bad_input_raises():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"token id must lie in \[0, 261\), got 999"):
        tok.decode([999])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
