"""Video items: the frame sampling rule (count and timing), decoding with PyAV, and a video
item through the family's video input (pixel_values_videos + video_grid_thw) into an embedding."""
from __future__ import annotations

import pytest
import torch
from zeroshot_fixtures import video

from umarvel.data.video import Sampling, decode, frame_count, frame_indices, load_video
from umarvel.errors import DataError


def test_frame_count_rule():
    # 10 s at 30 fps, sampled at 2 fps: 20 frames
    assert frame_count(300, 30.0, Sampling()) == 20
    # 1 s clip: 2 frames wanted, at least 4
    assert frame_count(30, 30.0, Sampling()) == 4
    # odd counts round to the two-frame temporal patch
    assert frame_count(75, 10.0, Sampling()) == 16  # 7.5 s * 2 = 15 -> 16
    # never more than the clip has (above the minimum), never more than max_frames
    assert frame_count(5, 1.0, Sampling(fps=4.0)) == 4
    assert frame_count(10_000, 10.0, Sampling(max_frames=8)) == 8
    # a fixed count (MSVD: 12) ignores the clip's length
    assert frame_count(20, 10.0, Sampling(frames=12)) == 12
    assert frame_count(2000, 25.0, Sampling(frames=12)) == 12


def test_frame_indices_span_first_to_last():
    assert frame_indices(20, 4) == [0, 6, 13, 19]
    assert frame_indices(100, 2) == [0, 99]
    assert frame_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # a short clip repeats frames
    assert frame_indices(7, 1) == [0]


def _levels(frames):
    import numpy as np

    return [round(float(np.asarray(f.convert("L")).mean())) for f in frames]


@pytest.mark.parametrize("suffix", ["mp4", "avi"])
def test_decode_takes_the_sampled_frames(tmp_path, suffix):
    clip = video(tmp_path / f"clip.{suffix}", frames=20, fps=10)  # 2 s; frame i is grey 10 * i
    frames, metadata = decode(clip, Sampling())  # 2 s at 2 fps: 4 frames, indices 0, 6, 13, 19
    assert len(frames) == 4
    assert _levels(frames) == pytest.approx([0, 60, 130, 190], abs=6)
    assert metadata == {"total_num_frames": 20, "fps": 10.0, "duration": 2.0, "frames_indices": [0, 6, 13, 19]}
    twelve, _ = decode(clip, Sampling(frames=12))
    assert _levels(twelve) == pytest.approx([10 * i for i in frame_indices(20, 12)], abs=6)


def test_video_item_forms(tmp_path):
    clip = video(tmp_path / "clip.mp4", frames=20, fps=10)
    assert len(load_video(str(clip))[0]) == 4
    assert len(load_video({"path": str(clip), "frames": 6})[0]) == 6
    frames, _ = load_video({"path": str(clip), "frames": 2})
    given, metadata = load_video(frames)  # a list of frames passes through, taken as 2 frames a second
    assert len(given) == 2 and metadata["fps"] == 2.0 and metadata["frames_indices"] == [0, 1]
    with pytest.raises(DataError, match="unknown keys"):
        load_video({"path": str(clip), "nframes": 12})
    with pytest.raises(DataError, match=r"missing.mp4: cannot decode video"):
        load_video(str(tmp_path / "missing.mp4"))


def test_video_item_collates_and_embeds(tmp_path, tiny_model_dir):
    from umarvel.modeling.embedder import Embedder

    dark, light = video(tmp_path / "a.mp4", shade=0), video(tmp_path / "b.mp4", shade=60)
    embedder = Embedder.from_pretrained(tiny_model_dir, device="cpu")
    batch = embedder.collate([{"video": {"path": str(dark), "frames": 4}},
                              {"text": "a clip", "instruction": "Find an everyday video match with caption."}])
    assert batch["video_grid_thw"].tolist()[0][0] == 2  # 4 frames, two per temporal patch
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert batch["pixel_values_videos"].shape[0] == t * h * w
    video_token = embedder.processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((batch["input_ids"][0] == video_token).sum()) == t * h * w // 4  # 2x2 merge
    assert int((batch["input_ids"][1] == video_token).sum()) == 0
    vectors = embedder.encode([{"video": str(dark)}, {"video": str(light)}, {"text": "a clip"}], convert_to_tensor=True)
    assert vectors.shape[0] == 3
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(vectors[0], vectors[1], atol=1e-4)  # the frames reach the model


@pytest.mark.parametrize("family_model_dir", ["qwen2.5-vl", "qwen3-vl"], indirect=True)
def test_frame_timing_reaches_the_processor(tmp_path, family_model_dir):
    """Qwen2.5-VL's M-RoPE step and Qwen3-VL's timestamps come from the clip's real timing."""
    from umarvel.modeling.embedder import Embedder

    clip = video(tmp_path / "clip.mp4", frames=20, fps=10)  # 2 s
    embedder = Embedder.from_pretrained(family_model_dir, device="cpu")
    batch = embedder.collate([{"video": {"path": str(clip), "frames": 4}}])  # 4 frames in 2 s: 2 per second
    if embedder.family.name == "qwen2.5-vl":
        assert batch["second_per_grid_ts"].tolist() == pytest.approx([1.0])  # 2 frames per grid step
    else:
        text = embedder.processor.tokenizer.decode(batch["input_ids"][0])
        assert "<0.3 seconds>" in text and "<1.6 seconds>" in text  # centres of frame pairs (0, 6) and (13, 19)
