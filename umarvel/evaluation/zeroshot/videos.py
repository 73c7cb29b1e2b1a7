"""Text -> video retrieval: MSR-VTT 1k-A and MSVD, R@1/5/10.

Videos go through the family's video input (umarvel/data/video.py: frames sampled as the paper's
settings say, fps 2 and at least 4 frames for MSR-VTT, 12 frames for MSVD).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from umarvel.data.files import read_utf8
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
        for line, row in csv_rows(path, ("video_id", "sentence")):
            vid, sentence = row["video_id"].strip(), row["sentence"].strip()
            if not vid or not sentence:
                raise DataError("empty video_id or sentence", file=str(path), line=line)
            self.videos[vid] = self.media("msrvtt", "videos", f"{vid}.mp4", where=path, line=line, what="video")
            self.captions.append((f"l{line}", sentence, vid))
        if not self.captions:
            raise DataError("no queries: the file has a header and no rows", file=str(path))


def csv_rows(path: Path, columns: tuple[str, ...]):
    """(line, {column: value}) of each row of a UTF-8 CSV file with a header naming `columns`.

    Strict where the csv module is lenient: an unbalanced quote would swallow the rows after it
    into one field, and a row with missing or extra cells would be padded or cut, both silently
    changing the test set; here a record spanning lines, or one whose cell count differs from
    the header's, is an error naming its first line."""
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""), strict=True)
    last = 0
    try:
        header = next(reader, [])
        for column in columns:
            if column not in header:
                raise DataError(f"header has no column {column!r} (has {header})", file=str(path), line=1)
        last = reader.line_num
        for cells in reader:
            line, last = last + 1, reader.line_num
            if last != line:
                raise DataError(f"a quoted field runs from this line to line {last} (an unbalanced quote?); a record "
                                "must stay on one line", file=str(path), line=line)
            if not cells:
                continue
            if len(cells) != len(header):
                raise DataError(f"{len(cells)} fields, the header has {len(header)}", file=str(path), line=line)
            yield line, dict(zip(header, cells))
    except csv.Error as err:
        runs_on = reader.line_num > last + 1
        span = f" (the record runs on to line {reader.line_num}: an unbalanced quote?)" if runs_on else ""
        raise DataError(f"not valid CSV: {err}{span}", file=str(path), line=last + 1) from None


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
        for line, raw in enumerate(read_utf8(list_path).splitlines(), start=1):
            vid = raw.strip()
            if not vid:
                continue
            if vid in self.videos:
                raise DataError(f"video {vid} is listed twice", file=str(list_path), line=line)
            if vid not in captions:
                raise DataError(f"video {vid} has no captions in {captions_path.name}", file=str(list_path),
                                line=line)
            self.videos[vid] = self.media("MSVD", "YouTubeClips", f"{vid}.avi", where=list_path, line=line,
                                          what="video")
            if not isinstance(captions[vid], list) or not captions[vid]:
                raise DataError(f"video {vid}: expected a non-empty list of captions", file=str(captions_path))
            for number, words in enumerate(captions[vid]):
                if isinstance(words, str) or not all(isinstance(w, str) for w in words) or not words:
                    raise DataError(f"video {vid}: caption {number} must be a non-empty list of words",
                                    file=str(captions_path))
                self.captions.append((f"{vid}#{number}", " ".join(words), vid))
        if not self.videos:
            raise DataError("no queries: no test videos are listed", file=str(list_path))
