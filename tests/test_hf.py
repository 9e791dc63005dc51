"""transfusion_fast.hf (attention inside transformers models) and Model.from_hf / text_logits.

Tiny randomly initialized Llama / Qwen2 / Mistral models are built in the tests (no download), in
float32. The registered attention is compared with transformers' eager attention given the
equivalent dense additive mask: logits and the gradients of every parameter, on the CPU,
reference and Triton (interpreter on CPU-only machines) backends.
"""
import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")  # the optional "hf" extra

from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,  # noqa: E402
                          Qwen2Config, Qwen2ForCausalLM)
from transformers.masking_utils import create_causal_mask  # noqa: E402

import transfusion_fast as tf  # noqa: E402
import transfusion_fast.hf as tfhf  # noqa: E402
from transfusion_fast import Layout, ModalityConfig, Model, pack  # noqa: E402
from transfusion_fast.hf_weights import convert_hf  # noqa: E402

VOCAB = 64
IMAGE = ModalityConfig("image", "image", channels=1, patch_size=2, max_size=4)
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_hf(kind: str = "llama", seed: int = 0, **overrides):
    """A tiny random HF causal LM in float32; Qwen2's q/k/v biases made non-zero."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**SIZES, **overrides}))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**SIZES, **overrides}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.5)
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**SIZES, "sliding_window": None, **overrides}))
    else:
        raise AssertionError(kind)
    with torch.no_grad():   # norms away from 1 so that a swapped norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.float().eval()


def with_attention(model, implementation: str):
    other = copy.deepcopy(model)
    other.set_attn_implementation(implementation)
    return other


def transfusion_layout() -> Layout:
    """Three documents: text–span–text (11), a single token, span at the start and at the end (9)."""
    cu = torch.tensor([0, 11, 12, 21], dtype=torch.int32)
    spans = torch.tensor([[3, 7], [12, 16], [18, 21]], dtype=torch.int32)
    return Layout.transfusion(cu, spans)


def additive_mask(layout: Layout) -> torch.Tensor:
    """The dense (1, 1, Tq, Tk) additive mask eager attention takes: 0 where visible, min elsewhere."""
    allowed = layout.dense_mask()
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


def logits_and_grads(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, **kwargs).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(logits.device)
    (logits * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def assert_same(a, b, atol=2e-5, rtol=2e-5):
    logits_a, grads_a = a
    logits_b, grads_b = b
    torch.testing.assert_close(logits_b, logits_a, atol=atol, rtol=rtol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=atol, rtol=rtol, msg=name)


# ------------------------------------------------------------------------------------- attention
def test_import_registers_the_attention_and_a_mask_that_builds_nothing():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["transfusion_fast"] is tfhf.attention_forward
    assert AttentionMaskInterface._global_mapping["transfusion_fast"] is tfhf.attention_mask
    model = with_attention(tiny_hf("llama"), "transfusion_fast")
    embeds = torch.zeros(1, 9, 64)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1]])
    mask = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=torch.ones(1, 9),
                              past_key_values=None, position_ids=position_ids)
    assert mask is None   # no dense mask is ever built for this implementation


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_packed_transfusion_layout_matches_eager_with_dense_mask(kind, backend):
    base = tiny_hf(kind)
    layout = transfusion_layout()
    ids = torch.randint(0, VOCAB, (1, layout.num_keys), generator=torch.Generator().manual_seed(0))
    position_ids = layout.positions[None].long()
    expected = logits_and_grads(with_attention(base, "eager"), ids, position_ids=position_ids,
                                attention_mask=additive_mask(layout))
    ours = with_attention(base, "transfusion_fast")
    with tf.use_backend(backend):
        got = logits_and_grads(ours, ids, position_ids=position_ids, layout=layout)
    assert_same(expected, got)
    # The spans are bidirectional: a causal model would give other logits.
    causal = logits_and_grads(with_attention(base, "eager"), ids, position_ids=position_ids,
                              attention_mask=additive_mask(Layout.causal(layout.cu_seqlens)))
    assert not torch.allclose(causal[0], got[0], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_transfusion_layout_on_cuda_matches_eager(kind):
    """The compiled Triton kernels under an HF model (CPU twin: the ``triton`` case above, run by
    the interpreter)."""
    base = tiny_hf(kind).cuda()
    layout = transfusion_layout().to("cuda")
    ids = torch.randint(0, VOCAB, (1, layout.num_keys), generator=torch.Generator().manual_seed(0)).cuda()
    position_ids = layout.positions[None].long()
    expected = logits_and_grads(with_attention(base, "eager"), ids, position_ids=position_ids,
                                attention_mask=additive_mask(layout))
    with tf.use_backend("auto"):
        got = logits_and_grads(with_attention(base, "transfusion_fast"), ids, position_ids=position_ids,
                               layout=layout)
    assert_same(expected, got, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_without_layout_packed_position_ids_give_causal_documents(kind):
    base = tiny_hf(kind)
    documents = Layout.causal(torch.tensor([0, 5, 6, 14], dtype=torch.int32))
    ids = torch.randint(0, VOCAB, (1, 14), generator=torch.Generator().manual_seed(2))
    position_ids = documents.positions[None].long()
    expected = logits_and_grads(with_attention(base, "eager"), ids, position_ids=position_ids,
                                attention_mask=additive_mask(documents))
    got = logits_and_grads(with_attention(base, "transfusion_fast"), ids, position_ids=position_ids)
    assert_same(expected, got)


def test_without_layout_batches_and_cu_seq_lens():
    base = tiny_hf("llama")
    ours, eager = with_attention(base, "transfusion_fast"), with_attention(base, "eager")
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))
    assert_same(logits_and_grads(eager, ids), logits_and_grads(ours, ids))   # batch 3, no padding
    # flash-attention style packing kwargs name the documents (here with positions 0..11 throughout,
    # so the documents can only come from cu_seq_lens)
    cu = torch.tensor([0, 4, 9, 12], dtype=torch.int32)
    flat = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    expected = logits_and_grads(eager, flat, attention_mask=additive_mask(Layout.causal(cu)))
    got = logits_and_grads(ours, flat, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    assert_same(expected, got)
    assert not torch.allclose(logits_and_grads(ours, flat)[0], got[0], atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generate_with_kv_cache_matches_eager(kind):
    base = tiny_hf(kind)
    prompts = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompts),
                  pad_token_id=0)
    expected = with_attention(base, "eager").generate(prompts, **kwargs)
    got = with_attention(base, "transfusion_fast").generate(prompts, **kwargs)
    assert got.shape == (2, 12) and torch.equal(got, expected)


def test_layout_path_agrees_with_the_transfusion_model_attention():
    """The HF path and ops.attention see the same mask: a document's logits do not depend on the
    documents packed next to it."""
    base = with_attention(tiny_hf("llama"), "transfusion_fast")
    layout = transfusion_layout()
    ids = torch.randint(0, VOCAB, (1, layout.num_keys), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        packed = base(ids, position_ids=layout.positions[None].long(), layout=layout).logits[0]
        alone = Layout.transfusion(torch.tensor([0, 9], dtype=torch.int32),
                                   torch.tensor([[0, 4], [6, 9]], dtype=torch.int32))
        last = base(ids[:, 12:], position_ids=alone.positions[None].long(), layout=alone).logits[0]
    torch.testing.assert_close(packed[12:], last, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case, words", [
    ("padding", ["padded batches", "(2, 6)", "Pack the sequences"]),
    ("dense_mask", ["4-D attention_mask", "(1, 1, 21, 21)", "layout="]),
    ("length", ["layout has 21 query rows", "21 keys", "20 tokens"]),
    ("batch", ["batch size must be 1", "got 2"]),
    ("dropout", ["dropout=0.5"]),
    ("sliding_window", ["sliding_window=4", "document of 11 tokens"]),
    ("not_a_layout", ["layout must be a transfusion_fast.Layout", "Tensor"]),
    ("block_mask", ["takes no BlockMask attention_mask", "layout="]),
])
def test_bad_input_is_named(case, words):
    layout = transfusion_layout()
    kind = "mistral" if case == "sliding_window" else "llama"
    extra = dict(sliding_window=4) if case == "sliding_window" else {}
    if case == "dropout":
        extra = dict(attention_dropout=0.5)
    model = with_attention(tiny_hf(kind, **extra), "transfusion_fast")
    ids = torch.randint(0, VOCAB, (1, 21))
    kwargs = dict(position_ids=layout.positions[None].long(), layout=layout)
    if case == "padding":
        ids = torch.randint(0, VOCAB, (2, 6))
        kwargs = dict(attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))
    elif case == "dense_mask":
        kwargs = dict(attention_mask=additive_mask(layout))
    elif case == "length":
        ids = ids[:, :20]
        kwargs["position_ids"] = kwargs["position_ids"][:, :20]
    elif case == "batch":
        ids = ids.expand(2, -1)
    elif case == "dropout":
        model.train()
    elif case == "sliding_window":
        kwargs = dict(position_ids=None, layout=layout)
    elif case == "not_a_layout":
        kwargs["layout"] = layout.kv_end
    elif case == "block_mask":
        from torch.nn.attention.flex_attention import create_block_mask
        kwargs = dict(attention_mask=create_block_mask(lambda b, h, q, kv: kv <= q, 1, None, 21, 21, device="cpu"))
    with pytest.raises((ValueError, TypeError)) as info:
        model(ids, **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_head_dim_the_kernels_lack_is_named():
    model = with_attention(tiny_hf("llama", head_dim=8), "transfusion_fast")
    with pytest.raises(ValueError, match=r"head_dim must be one of .*got 8"):
        model(torch.randint(0, VOCAB, (1, 5)))


# ------------------------------------------------------------------------------------- from_hf
@pytest.mark.parametrize("kind, tied, shard", [("llama", False, False), ("llama", True, False),
                                               ("llama", False, True), ("qwen2", False, False),
                                               ("qwen2", True, False), ("mistral", False, False)])
def test_from_hf_text_logits_match_the_hf_model(tmp_path, kind, tied, shard):
    hf = tiny_hf(kind, tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                 rms_norm_eps=1e-5)
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "1GB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == shard
    model = Model.from_hf(tmp_path, modalities=(IMAGE,)).eval()
    c = model.config
    assert (c.dim, c.depth, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_hidden) == (64, 2, 4, 2, 16, 96)
    assert (c.rope_theta, c.norm_eps, c.qkv_bias) == (5000.0, 1e-5, kind == "qwen2")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model.text_logits(ids)
        single = model.text_logits(ids[1])
    assert got.shape == (2, 12, c.vocab_size)
    torch.testing.assert_close(got[..., :VOCAB], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(single, got[1], atol=1e-5, rtol=0)


def test_from_hf_in_memory_model_and_special_tokens():
    hf = tiny_hf("llama", bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0)
    model = Model.from_hf(hf, modalities=(IMAGE,))
    c = model.config
    # BOI/EOI appended after the checkpoint's vocabulary; bos/eos/pad from the HF config
    assert (c.bos_id, c.eos_id, c.pad_id, c.boi_id, c.eoi_id, c.vocab_size) == (1, 2, 0, 64, 65, 66)
    emb = model.tok_embeddings.weight.detach()
    torch.testing.assert_close(emb[:VOCAB], hf.model.embed_tokens.weight)
    mean = hf.model.embed_tokens.weight.mean(0)
    for row in (64, 65):   # near the mean of the existing rows, and distinct
        assert (emb[row] - mean).norm() < 0.5 * (hf.model.embed_tokens.weight - mean).norm(dim=1).mean()
    assert not torch.equal(emb[64], emb[65])
    # explicit ids and token strings (a string the vocabulary lacks is appended)
    given = Model.from_hf(hf, modalities=(IMAGE,), special_tokens={"boi": 10, "eoi": "<eoi>", "pad": 5})
    g = given.config
    assert (g.boi_id, g.eoi_id, g.pad_id, g.vocab_size) == (10, 64, 5, 65)
    conv = convert_hf(hf)
    assert conv.added_tokens == {"boi": 64, "eoi": 65} and conv.text_vocab_size == 64


def test_from_hf_finds_specials_in_the_tokenizer_json(tmp_path):
    hf = tiny_hf("llama", bos_token_id=None, eos_token_id=2)
    hf.save_pretrained(tmp_path)
    tokens = {"model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1, "</s>": 2}},
              "added_tokens": [{"id": 60, "content": "<boi>"}, {"id": 61, "content": "<eoi>"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokens))
    c = Model.from_hf(tmp_path, modalities=(IMAGE,)).config
    assert (c.boi_id, c.eoi_id, c.eos_id, c.bos_id, c.vocab_size) == (60, 61, 2, 64, 65)   # BOS appended


def test_from_hf_model_trains_on_packed_transfusion_batches_and_freeze_text():
    hf = tiny_hf("qwen2")
    model = Model.from_hf(hf, modalities=(IMAGE,), freeze_text=True, prediction="v")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.startswith("heads.") for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    heads_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    samples = [[torch.tensor([3, 4, 5]), torch.randn(1, 4, 4, generator=g), torch.tensor([6])],
               [torch.tensor([7, 8])]]
    batch = pack(samples, model.config, seed=0)
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["lm_tokens"] > 0 and out["spans"] == 1
    out["loss"].backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert any(not torch.equal(p, heads_before[n]) for n, p in model.named_parameters() if p.requires_grad)
    # without freezing every parameter trains
    full = Model.from_hf(hf, modalities=(IMAGE,))
    assert all(p.requires_grad for p in full.parameters())


def test_from_hf_adaln_layers_are_new_parameters():
    model = Model.from_hf(tiny_hf("llama"), modalities=(IMAGE,), conditioning="adaln_zero", freeze_text=True)
    trainable = {n.split(".")[0] if not n.startswith("layers.") else n.split(".")[2]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"heads", "adaln", "final_adaln"}


def _save_and_edit(tmp_path, model, **edits):
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config.update(edits)
    path.write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("edit, words", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), ["rope scaling 'llama3'"]),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), ["rope scaling 'linear'"]),
    (dict(tie_word_embeddings=False), ["tie_word_embeddings=False", "no lm_head.weight", "tied/untied"]),
    (dict(model_type="qwen3"), ["model_type 'qwen3'", "llama"]),
    (dict(hidden_act="gelu"), ["hidden_act", "'gelu'"]),
    (dict(num_hidden_layers=1), ["layers [1]", "num_hidden_layers=1"]),
    (dict(intermediate_size=80), ["gate_proj.weight", "(96, 64)", "(80, 64)"]),
    (dict(partial_rotary_factor=0.5), ["partial_rotary_factor=0.5"]),
])
def test_from_hf_refuses_what_it_cannot_map(tmp_path, edit, words):
    path = _save_and_edit(tmp_path, tiny_hf("llama", tie_word_embeddings=True), **edit)
    with pytest.raises(ValueError) as info:
        Model.from_hf(path)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_from_hf_refuses_more_bad_input(tmp_path):
    with pytest.raises(ValueError, match="head_dim 8 is not one the attention kernels support"):
        Model.from_hf(tiny_hf("llama", head_dim=8))
    untied = tiny_hf("llama", tie_word_embeddings=True)
    untied.config.tie_word_embeddings = True
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach() + 1.0)
    with pytest.raises(ValueError, match="lm_head.weight differs.*tied/untied mismatch"):
        Model.from_hf(untied)
    with pytest.raises(ValueError, match="attention_bias=True"):
        Model.from_hf(tiny_hf("llama", attention_bias=True))
    with pytest.raises(ValueError, match=r"\['dim', 'n_heads'\] come from the checkpoint"):
        Model.from_hf(tiny_hf("llama"), dim=32, n_heads=2)
    with pytest.raises(ValueError, match="max_seq_len must be a positive int <= 128"):
        Model.from_hf(tiny_hf("llama"), max_seq_len=4096)
    with pytest.raises(ValueError, match="special_tokens has unknown names"):
        Model.from_hf(tiny_hf("llama"), special_tokens={"image": 3})
    with pytest.raises(ValueError, match="must be distinct ids"):
        Model.from_hf(tiny_hf("llama"), special_tokens={"boi": 1})    # the HF bos id
    with pytest.raises(FileNotFoundError, match="config.json"):
        Model.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf("llama").config.to_dict()))
    with pytest.raises(ValueError, match=r"no \*.safetensors weights"):
        Model.from_hf(tmp_path)
    with pytest.raises(TypeError, match="local checkpoint directory or a model"):
        Model.from_hf(42)
    # Mistral's sliding window caps the document length: documents never outgrow it
    assert Model.from_hf(tiny_hf("mistral", sliding_window=32)).config.max_seq_len == 32


def test_text_logits_bad_input():
    model = Model.from_hf(tiny_hf("llama"), modalities=(IMAGE,))
    with pytest.raises(ValueError, match=r"ids must be a non-empty int32/int64 tensor.*torch.float32"):
        model.text_logits(torch.zeros(4))
    with pytest.raises(ValueError, match=r"vocab_size=66\), got values in \[0, 66\]"):
        model.text_logits(torch.tensor([0, 66]))


def test_hf_checkpoint_round_trips_through_save_checkpoint(tmp_path):
    model = Model.from_hf(tiny_hf("qwen2", tie_word_embeddings=True), modalities=(IMAGE,))
    tf.save_checkpoint(tmp_path / "m.safetensors", model)
    loaded, _ = tf.load_checkpoint(tmp_path / "m.safetensors")
    ids = torch.randint(0, VOCAB, (9,))
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_logits(ids), model.text_logits(ids), atol=0, rtol=0)


# ------------------------------------------------------------------------------------- example
def tiny_checkpoint_with_tokenizer(path) -> None:
    """A tiny random Llama checkpoint plus a word-level tokenizer over the digit captions, saved the
    way a downloaded checkpoint is (config.json, model.safetensors, tokenizer files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from transfusion_fast.app.data import CAPTION_TEMPLATES, DIGIT_WORDS

    words = ["<unk>", "<s>", "</s>"] + sorted({w for t in CAPTION_TEMPLATES for w in t.split() if "{" not in w}
                                              | set(DIGIT_WORDS) | {str(d) for d in range(10)})
    assert len(words) <= VOCAB
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    tiny_hf("llama", bos_token_id=1, eos_token_id=2, tie_word_embeddings=True).save_pretrained(path)


def test_example_turns_an_hf_checkpoint_into_transfusion_and_fine_tunes_on_digits(tmp_path, capsys):
    import importlib.util

    tiny_checkpoint_with_tokenizer(tmp_path / "hf")
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "llama_to_transfusion.py")
    spec = importlib.util.spec_from_file_location("llama_to_transfusion", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--steps", "30",
                           "--batch-size", "8", "--lr", "3e-3", "--log-every", "10", "--sample-steps", "3"])
    losses = result["losses"]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(list(x.values()))).all() for x in losses)
    first = sum(x["lm_loss"] for x in losses[:5]) / 5
    last = sum(x["lm_loss"] for x in losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)          # the captions are learned
    c = result["config"]
    assert (c.bos_id, c.eos_id, c.boi_id, c.eoi_id, c.vocab_size) == (1, 2, 64, 65, 66)
    assert result["samples"].shape == (10, 1, 8, 8) and torch.isfinite(result["samples"]).all()
    loaded, info = tf.load_checkpoint(result["checkpoint"])
    assert info["step"] == 30 and loaded.config == c
    assert "step 30: loss" in capsys.readouterr().out


def test_new_config_fields_default_to_the_old_model_and_are_validated():
    from transfusion_fast import ModelConfig

    base = ModelConfig()
    assert base.ffn_hidden_size is None and base.qkv_bias is False and base.ffn_hidden == 192
    model = Model(ModelConfig(ffn_hidden_size=100, qkv_bias=True))
    assert model.layers[0].feed_forward.w13.weight.shape == (200, 64)
    assert model.layers[0].attention.wqkv.bias.shape == (192,)
    with pytest.raises(ValueError, match=r"ffn_hidden_size must be a positive int <= 2147483647, got int 0"):
        ModelConfig(ffn_hidden_size=0)
    with pytest.raises(ValueError, match=r"qkv_bias must be a bool \(True or False\), got int 1"):
        ModelConfig(qkv_bias=1)
