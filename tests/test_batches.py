"""The inference input pipeline (umarvel/modeling/batches.py): worker processes prepare the same
batches as the in-process path, so embeddings and scores are equal and in item order; a bad
item is reported in the main process as a DataError naming it; the torchvision image
processor gives the PIL one's inputs within float rounding."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from umarvel import Embedder
from umarvel.backbone import load_processor
from umarvel.data.collator import Collator
from umarvel.errors import DataError
from umarvel.modeling.batches import CPU_WORKER_MIN_BATCHES, estimated_tokens, length_batches, worker_count
from umarvel.modeling.reranker import Reranker

# torchvision and PIL normalise in float32 in another order: pixel values differ by rounding
# (measured ~1e-6); the embeddings of the tiny model move by less than this.
PIXEL_TOLERANCE = 1e-5
EMBEDDING_TOLERANCE = 1e-5


def write_jpeg(path, width: int, height: int, seed: int) -> str:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return str(path)


@pytest.fixture()
def file_items(tmp_path, mixed_items):
    """Mixed text / image / image+text items, images as JPEG files of M-BEIR-like sizes and as
    PIL images, in an order that length sorting permutes."""
    sizes = [(640, 480), (333, 517), (1000, 300), (480, 640), (300, 300)]
    files = [write_jpeg(tmp_path / f"{i}.jpg", w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    items = [
        {"did": "0:0", "image": files[0], "text": "a photo with a long caption about many things in it " * 3},
        {"did": "0:1", "text": "short"},
        {"did": "0:2", "image": files[1]},
        {"did": "0:3", "image": files[2], "text": "what is this?", "instruction": "Answer the question."},
        {"did": "0:4", "text": "a medium sized caption of a picture of a dog", "instruction": "Find the image."},
        {"did": "0:5", "image": files[3]},
        {"did": "0:6", "image": files[4], "text": "tiny"},
    ]
    return items + list(mixed_items)


def test_worker_pipeline_equals_in_process_encoding(tiny_model_dir, file_items, tmp_path):
    from zeroshot_fixtures import video

    items = file_items + [{"did": "0:9", "video": str(video(tmp_path / "clip.mp4")), "text": "a grey fade"}]
    emb = Embedder.from_pretrained(tiny_model_dir)
    in_process = emb.encode(items, batch_size=3, num_workers=0, convert_to_tensor=True)
    with_workers = emb.encode(items, batch_size=3, num_workers=2, convert_to_tensor=True)
    one_by_one = torch.cat([emb.encode([item], num_workers=0, convert_to_tensor=True) for item in items])
    assert with_workers.shape == (len(items), emb.backbone.config.get_text_config().hidden_size)
    assert (with_workers - in_process).abs().max() <= 1e-6
    # Same order as the items: each row is its own item's embedding, whatever batch it rode in.
    assert (with_workers - one_by_one).abs().max() < 1e-4
    assert torch.allclose(with_workers.norm(dim=1), torch.ones(len(items)), atol=1e-5)


def test_worker_pipeline_equals_in_process_reranker_scores(tiny_model_dir, file_items):
    reranker = Reranker.from_pretrained(tiny_model_dir)
    queries = [item for item in file_items if item.get("text")]
    pairs = [(query, candidate) for query in queries[:3] for candidate in file_items[:4]]
    in_process = reranker.score(pairs, batch_size=4, num_workers=0)
    with_workers = reranker.score(pairs, batch_size=4, num_workers=2)
    assert with_workers.shape == (len(pairs),)
    assert (with_workers - in_process).abs().max() <= 1e-6


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_image_is_reported_naming_its_file_and_item(tiny_model_dir, file_items, tmp_path, workers):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    items = file_items + [{"did": "7:42", "image": str(broken), "text": "a caption"}]
    emb = Embedder.from_pretrained(tiny_model_dir)
    with pytest.raises(DataError) as caught:
        emb.encode(items, batch_size=3, num_workers=workers, convert_to_tensor=True)
    message = str(caught.value)
    assert message.startswith(f"{broken}: cannot read image")
    assert "did 7:42" in message and "Traceback" not in message and "worker" not in message
    assert caught.value.file == str(broken)


def test_torchvision_image_processor_matches_pil(tiny_model_dir, file_items):
    emb = Embedder.from_pretrained(tiny_model_dir)
    assert type(emb.processor.image_processor).__name__ == "Qwen2VLImageProcessor"  # the torchvision one
    bounds = emb.family.pixel_bounds(emb.settings.prompt)
    pil = load_processor(tiny_model_dir, *bounds, image_backend="pil")
    assert type(pil.image_processor).__name__.endswith("Pil")
    images = [item for item in file_items if item.get("image") is not None]
    fast = emb.collator(images)
    slow = Collator(pil, emb.settings.prompt, emb.family, mask_instruction=True)(images)
    assert fast.keys() == slow.keys()
    for key in fast:
        if key != "pixel_values":
            assert torch.equal(fast[key], slow[key]), key
    assert (fast["pixel_values"] - slow["pixel_values"]).abs().max() <= PIXEL_TOLERANCE
    emb_pil = Embedder(emb.backbone, pil, emb.settings)
    from_paths = emb.encode(images, num_workers=0, convert_to_tensor=True)
    assert (from_paths - emb_pil.encode(images, num_workers=0, convert_to_tensor=True)).abs().max() <= EMBEDDING_TOLERANCE


@contextlib.contextmanager
def threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_batches_follow_length_and_workers_never_outnumber_the_batches():
    assert length_batches([(1, 5), (0, 9), (0, 2), (1, 1)], 2) == [[2, 1], [3, 0]]
    bounds, unit = (4 * 28 * 28, 16 * 28 * 28), 28
    text, image = {"text": "x" * 40}, {"image": Image.new("RGB", (112, 56)), "text": "x" * 8}
    assert estimated_tokens(text, bounds, unit) == (0, 10)
    assert estimated_tokens(image, bounds, unit) == (1, 8 + 2)  # 112 x 56 px = 8 tokens of 28 x 28
    assert estimated_tokens({"image": Image.new("RGB", (1000, 1000))}, bounds, unit) == (1, 16)  # max_pixels
    assert estimated_tokens({"video": "clip.mp4"}, bounds, unit)[0] == 2
    assert estimated_tokens({"image": [image["image"], image["image"]]}, bounds, unit) == (1, 16)  # 2 x 8
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cores = len(os.sched_getaffinity(0))
    with threads(cores):
        assert worker_count(None, cpu, batches=100) == 0  # CPU at torch's default: the forward has every core
    with threads(1):  # run.cpu_threads 1: the spare cores prepare inputs, on sets long enough to repay a start
        assert worker_count(-1, cpu, batches=100) == min(4, cores - 1)
        assert worker_count(-1, cpu, batches=CPU_WORKER_MIN_BATCHES - 1) == 0
    assert worker_count(3, cpu, batches=100) == 3
    assert worker_count(3, cpu, batches=2) == 1
    assert worker_count(-1, cuda, batches=1) == 0
    with pytest.raises(ValueError):
        worker_count(-2, cpu, batches=10)
