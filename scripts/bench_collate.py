"""Collation cost of tokenising rendered prompts piece by piece (user text never parsed as
special tokens) against one processor call on the whole rendered text (the collator before
issue #12), on the same items: `python scripts/bench_collate.py [--items 256] [--batch-size 32]`.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from bench_encode import interleaved_best, make_items
from umarvel import Embedder
from umarvel.data.collator import load_image
from umarvel.data.prompts import render
from umarvel.tiny import build_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    items = make_items(args.items)
    batches = [items[i : i + args.batch_size] for i in range(0, len(items), args.batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        embedder = Embedder.from_pretrained(build_tiny_model(os.path.join(tmp, "m")), device="cpu", dtype="float32")
    collator, processor = embedder.collator, embedder.processor

    def piecewise():
        for batch in batches:
            collator(batch)

    def whole_text():
        for batch in batches:
            rendered = [render(item, collator.prompt, collator.family.chat, processor.tokenizer) for item in batch]
            images = [load_image(image, collator.prompt, collator.family) for r in rendered for image in r.images]
            processor(text=[r.text for r in rendered], images=images or None, padding=True, return_tensors="pt",
                      return_offsets_mapping=True, return_mm_token_type_ids=True)

    load = os.getloadavg()[0]
    seconds = interleaved_best([piecewise, whole_text], args.repeats)
    rates = [args.items / s for s in seconds]
    print(f"{args.items} items, batch {args.batch_size}, best of {args.repeats} (load {load:.2f} -> {os.getloadavg()[0]:.2f})")
    print(f"piecewise collation (umarvel)        {rates[0]:9.1f} items/s")
    print(f"one processor call on the whole text {rates[1]:9.1f} items/s")
    print(f"ratio piecewise / whole              {rates[0] / rates[1]:9.3f}")


if __name__ == "__main__":
    main()
