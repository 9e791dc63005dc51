"""Turn a local Hugging Face LLaMA-family checkpoint into a Transfusion model and fine-tune it on
captioned handwritten digits (scikit-learn's 8×8 set: offline, no download).

    python examples/llama_to_transfusion.py --hf /path/to/SmolLM2-135M --steps 2000 --out runs/llm_digits
    python examples/llama_to_transfusion.py --hf /path/to/SmolLM2-135M --freeze-text ...  # LlamaFusion-style

1. ``Model.from_hf`` maps the checkpoint's weights onto a ``transfusion_fast.Model`` (BOI/EOI
   appended to the vocabulary when the tokenizer lacks ``<boi>``/``<eoi>``) and adds a freshly
   initialized image head; ``--freeze-text`` trains that head only.
2. Captions go through the checkpoint's own tokenizer; every step packs caption → image and
   image → caption samples into one sequence (causal text, bidirectional image spans).
3. AdamW trains on LM + λ·diffusion loss; the result is saved as a transfusion_fast checkpoint and,
   with ``--sample-steps``, one image per digit is generated from its caption.
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch

import transfusion_fast as tf
from transfusion_fast import ModalityConfig, Model, pack
from transfusion_fast.app.data import caption_for, load_digits_data   # the digits data (one import line)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="local HF checkpoint directory (config.json, *.safetensors, "
                                               "tokenizer)")
    p.add_argument("--out", default="runs/llm_digits", help="where the checkpoint (and samples) go")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16, help="samples packed per step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--freeze-text", action="store_true", help="train the image head only")
    p.add_argument("--sample-steps", type=int, default=0, help="diffusion steps of the final samples "
                                                              "(0: no sampling)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def training_samples(data, encode, batch_size: int, rng: random.Random) -> list:
    """Half caption → image (varied captions), half image → canonical caption."""
    samples = []
    for _ in range(batch_size):
        i = rng.randrange(len(data.train_labels))
        image, label = data.train_images[i], int(data.train_labels[i])
        if rng.random() < 0.5:
            samples.append([encode(caption_for(label, rng)), image])
        else:
            samples.append([image, encode(caption_for(label))])
    return samples


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer   # the optional "hf" extra

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.hf)
    image = ModalityConfig("image", "image", channels=1, patch_size=2, max_size=8)   # 16 patches
    model = Model.from_hf(args.hf, tokenizer=tokenizer, freeze_text=args.freeze_text,
                          modalities=(image,), prediction="v", max_seq_len=128)
    c = model.config
    print(f"{args.hf}: {model.num_parameters() / 1e6:.1f}M parameters, dim {c.dim}, depth {c.depth}, "
          f"heads {c.n_heads}/{c.n_kv_heads}; bos {c.bos_id} eos {c.eos_id} boi {c.boi_id} eoi {c.eoi_id} "
          f"(vocabulary {c.vocab_size})")

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    data = load_digits_data(8, seed=args.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0 if args.freeze_text else 0.01)
    rng = random.Random(args.seed)
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        batch = pack(training_samples(data, encode, args.batch_size, rng), c, seed=args.seed * 100_003 + step)
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append({k: out[k].item() for k in ("loss", "lm_loss", "diffusion_loss")})
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step}: loss {out['loss'].item():.4f} (lm {out['lm_loss'].item():.4f}, diffusion "
                  f"{out['diffusion_loss'].item():.4f}), {batch.num_tokens} tokens, "
                  f"{time.perf_counter() - start:.1f}s")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "checkpoint.safetensors")
    tf.save_checkpoint(path, model, step=args.steps, extra={"hf": os.path.abspath(args.hf)})
    result = {"losses": losses, "checkpoint": path, "config": c}
    if args.sample_steps:
        model.eval()
        prompts = [[torch.cat([encode(caption_for(d)), torch.tensor([c.boi_id])])] for d in range(10)]
        outs = model.generate(prompts, max_new_tokens=0, num_inference_steps=args.sample_steps,
                              seed=args.seed, span_shape=(1, 8, 8), progress=False)
        images = torch.stack([next(x for x in o if x.is_floating_point()) for o in outs])
        torch.save(images, os.path.join(args.out, "samples.pt"))
        result["samples"] = images
        print(f"samples: {tuple(images.shape)} in {os.path.join(args.out, 'samples.pt')}")
    print(f"checkpoint: {path}")
    return result


if __name__ == "__main__":
    main()
