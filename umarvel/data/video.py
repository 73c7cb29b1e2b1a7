"""Video items: which frames a clip is sampled at, and decoding them with PyAV.

An item's `video` is a list of frames (PIL images or image paths, taken as sampled at 2 frames
a second), a video path, or a dict `{"path": ..., "fps": 2.0, "min_frames": 4}` /
`{"path": ..., "frames": 12}` saying how to sample it (a bare path samples at the Qwen-VL
default, 2 frames a second, at least 4). Items stay plain picklable dicts; frames are decoded
in the collator, so in DataLoader workers. Each video comes with its metadata (the clip's
frame count and rate, the sampled indices), from which the processors derive the frames'
timing (Qwen2.5-VL's `second_per_grid_ts`, Qwen3-VL's timestamps).

The sampling rule (the one qwen-vl-utils applies, which the paper's video numbers use):
a fixed count, or duration x fps clamped to [min_frames, min(max_frames, total frames)];
then rounded to a multiple of FRAME_FACTOR (the processors' temporal patch: two frames make one
temporal token) and spread evenly from the first to the last frame, indices rounded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from umarvel.data.images import open_image, to_rgb
from umarvel.errors import DataError

FRAME_FACTOR = 2
DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768


@dataclass(frozen=True)
class Sampling:
    """How many frames to take: `frames` fixed, else `fps` within [min_frames, max_frames]."""

    frames: int | None = None
    fps: float = DEFAULT_FPS
    min_frames: int = DEFAULT_MIN_FRAMES
    max_frames: int = DEFAULT_MAX_FRAMES


def _round_to_factor(n: float) -> int:
    return max(FRAME_FACTOR, round(n / FRAME_FACTOR) * FRAME_FACTOR)


def frame_count(total_frames: int, video_fps: float, sampling: Sampling) -> int:
    """The number of frames to sample from a clip of `total_frames` at `video_fps`."""
    if sampling.frames is not None:
        return _round_to_factor(sampling.frames)
    wanted = total_frames / video_fps * sampling.fps
    upper = max(sampling.min_frames, min(sampling.max_frames, total_frames))
    return _round_to_factor(min(max(wanted, sampling.min_frames), upper))


def frame_indices(total_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over [0, total_frames - 1], first and last included;
    a clip shorter than `count` repeats frames rather than inventing any."""
    if total_frames < 1:
        raise ValueError("a video needs at least one frame")
    if count == 1:
        return [0]
    step = (total_frames - 1) / (count - 1)
    return [round(i * step) for i in range(count)]


def parse_video(value) -> tuple[Path | None, list | None, Sampling]:
    """An item's `video` -> (path to decode, or given frames, and the sampling)."""
    if isinstance(value, (list, tuple)):
        return None, list(value), Sampling()
    if isinstance(value, (str, Path)):
        return Path(value), None, Sampling()
    if isinstance(value, dict) and "path" in value:
        unknown = set(value) - {"path", "frames", "fps", "min_frames", "max_frames"}
        if unknown:
            raise DataError(f"video item has unknown keys {sorted(unknown)}", field="video")
        options = {k: value[k] for k in ("frames", "fps", "min_frames", "max_frames") if k in value}
        return Path(value["path"]), None, Sampling(**options)
    raise DataError(f"a video is a list of frames, a path or a dict with 'path', got {type(value).__name__}",
                    field="video")


def _open_frame(frame) -> Image.Image:
    return to_rgb(frame) if isinstance(frame, Image.Image) else open_image(frame)


def decode(path: Path, sampling: Sampling) -> tuple[list[Image.Image], dict]:
    """The sampled frames of the video at `path` (RGB, in time order) and their metadata."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            video_fps = float(stream.average_rate or 0) or 25.0
            total = stream.frames or sum(1 for _ in container.decode(stream))
            count = frame_count(total, video_fps, sampling)
            wanted = frame_indices(total, count)
            container.seek(0)
            kept: dict[int, Image.Image] = {}
            targets = set(wanted)
            for index, frame in enumerate(container.decode(stream)):
                if index in targets:
                    kept[index] = to_rgb(frame.to_image())
                if index >= wanted[-1]:
                    break
    except (av.error.FFmpegError, IndexError, OSError) as err:
        raise DataError(f"cannot decode video: {err}", file=str(path)) from None
    if len(kept) < len(targets):
        raise DataError(f"video has {len(kept)} readable frames of the {len(targets)} sampled "
                        f"(container says {total})", file=str(path))
    metadata = {"total_num_frames": total, "fps": video_fps, "duration": total / video_fps, "frames_indices": wanted}
    return [kept[i] for i in wanted], metadata


def load_video(value) -> tuple[list[Image.Image], dict]:
    """An item's `video` as the RGB frames the processor takes, and their metadata."""
    path, frames, sampling = parse_video(value)
    if frames is None:
        return decode(path, sampling)
    if not frames:
        raise DataError("video item has an empty frame list", field="video")
    count = len(frames)
    metadata = {"total_num_frames": count, "fps": DEFAULT_FPS, "duration": count / DEFAULT_FPS,
                "frames_indices": list(range(count))}
    return [_open_frame(frame) for frame in frames], metadata
