"""Text -> video retrieval: MSR-VTT 1k-A and MSVD, R@1/5/10.

Videos go through the family's video input (umarvel/data/video.py: frames sampled as the paper's
settings say, fps 2 and at least 4 frames for MSR-VTT, 12 frames for MSVD).
"""
from __future__ import annotations

import csv
from pathlib import Path

from umarvel.errors import DataError
from umarvel.evaluation.protocol import Retrieval
from umarvel.evaluation.zeroshot.base import (
    ZeroShotBenchmark,
    item_set,
    query_item,
    ranked_ids,
)
from umarvel.evaluation.zeroshot.metrics import hit_rates
from umarvel.evaluation.zeroshot.safe_load import load_plain_pickle


class TextToVideo(ZeroShotBenchmark):
    """`captions` [(query id, text, video id)] over `videos` {video id: path}."""

    ks = (1, 5, 10)
    sampling: dict
    real_videos: int
    captions: list[tuple[str, str, str]]
    videos: dict[str, Path]
    sources: list[Path]

    @property
    def is_real_data(self) -> bool:
        return len(self.videos) == self.real_videos

    def retrievals(self) -> list[Retrieval]:
        instruction = self.instruction("t2v")
        queries = [query_item(qid, instruction, text=text) for qid, text, _ in self.captions]
        videos = [{"id": vid, "video": {"path": str(path), **self.sampling}} for vid, path in self.videos.items()]
        return [Retrieval("t2v", item_set(f"{self.name}-captions", queries, self.sources),
                          item_set(f"{self.name}-videos", videos, self.sources), k=max(self.ks))]

    def score(self, rankings) -> dict[str, float]:
        search = self.retrievals()[0]
        targets = {qid: {vid} for qid, _, vid in self.captions}
        recall = hit_rates(ranked_ids(rankings, "t2v", search.queries), targets, self.ks)
        return {f"R@{k}": value for k, value in recall.items()}


class MSRVTT(TextToVideo):
    """`msrvtt/annotations/MSRVTT_JSFUSION_test.csv` (columns video_id, sentence; one row per
    test pair), videos `msrvtt/videos/{video_id}.mp4`."""

    name = "msrvtt"
    sampling = {"fps": 2.0, "min_frames": 4}
    real_videos = 1000
    paper = {"R@1": 47.2, "R@5": 72.0, "R@10": 80.2}

    def read(self) -> None:
        path = self.root / "msrvtt" / "annotations" / "MSRVTT_JSFUSION_test.csv"
        if not path.is_file():
            raise DataError("file not found; see README (Zero-shot evaluation)", file=str(path))
        self.captions, self.videos, self.sources = [], {}, [path]
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for column in ("video_id", "sentence"):
                if column not in (reader.fieldnames or []):
                    raise DataError(f"header has no column {column!r} (has {reader.fieldnames})", file=str(path),
                                    line=1)
            for row in reader:
                line = reader.line_num
                vid, sentence = (row["video_id"] or "").strip(), (row["sentence"] or "").strip()
                if not vid or not sentence:
                    raise DataError("empty video_id or sentence", file=str(path), line=line)
                video = self.root / "msrvtt" / "videos" / f"{vid}.mp4"
                if not video.is_file():
                    raise DataError(f"video {video} does not exist", file=str(path), line=line)
                self.videos[vid] = video
                self.captions.append((f"l{line}", sentence, vid))
        if not self.captions:
            raise DataError("no test rows", file=str(path))


class MSVD(TextToVideo):
    """`MSVD/test_list.txt` (one video id a line), `MSVD/raw-captions.pkl` ({video id: [caption
    as a list of words, ...]}, a pickle, loaded without running code), `MSVD/YouTubeClips/{id}.avi`.
    Every caption of a test video is a query whose positive is that video."""

    name = "msvd"
    sampling = {"frames": 12}
    real_videos = 670
    paper = {"R@1": 54.6, "R@5": 80.9, "R@10": 87.7}

    def read(self) -> None:
        folder = self.root / "MSVD"
        list_path, captions_path = folder / "test_list.txt", folder / "raw-captions.pkl"
        if not list_path.is_file():
            raise DataError("file not found; see README (Zero-shot evaluation)", file=str(list_path))
        captions = load_plain_pickle(captions_path)
        if not isinstance(captions, dict):
            raise DataError(f"expected a dict of video id -> captions, got {type(captions).__name__}",
                            file=str(captions_path))
        self.captions, self.videos, self.sources = [], {}, [list_path, captions_path]
        for line, raw in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
            vid = raw.strip()
            if not vid:
                continue
            if vid in self.videos:
                raise DataError(f"video {vid} is listed twice", file=str(list_path), line=line)
            if vid not in captions:
                raise DataError(f"video {vid} has no captions in {captions_path.name}", file=str(list_path),
                                line=line)
            video = folder / "YouTubeClips" / f"{vid}.avi"
            if not video.is_file():
                raise DataError(f"video {video} does not exist", file=str(list_path), line=line)
            self.videos[vid] = video
            for number, words in enumerate(captions[vid]):
                if isinstance(words, str) or not all(isinstance(w, str) for w in words) or not words:
                    raise DataError(f"video {vid}: caption {number} must be a non-empty list of words",
                                    file=str(captions_path))
                self.captions.append((f"{vid}#{number}", " ".join(words), vid))
        if not self.videos:
            raise DataError("no test videos", file=str(list_path))
