"""VisDial v1.0 val: a dialogue (its rounds of questions and answers) -> its image."""
from __future__ import annotations

from umarvel.config import ZeroShotEvalConfig
from umarvel.errors import DataError
from umarvel.evaluation.protocol import Retrieval
from umarvel.evaluation.zeroshot.base import (
    Ids,
    ZeroShotBenchmark,
    field,
    item_set,
    json_records,
    query_item,
    ranked_ids,
)
from umarvel.evaluation.zeroshot.metrics import hit_rates


class VisDial(ZeroShotBenchmark):
    """`visdial/visdial_1.0_val.json` ({"data": {questions, answers, dialogs}}); images
    `visdial/VisualDialog_val2018/VisualDialog_val2018_{image_id:012d}.jpg`.

    The query text is every round as "Q: {question}? A: {answer}.", joined by spaces, as the
    official evaluation (chaxjli/U-MARVEL dataset/datasets_visdial.py) builds it, which is what
    the paper's 70.3 R@1 was measured with; `eval.zeroshot.visdial_caption` puts the image's
    caption first. The two are item sets of their own names, so neither is served the other's
    cached vectors.
    """

    name = "visdial"
    ks = (1, 5, 10)
    paper = {"R@1": 70.3}
    REAL_DIALOGS = 2064

    @property
    def with_caption(self) -> bool:
        return (self.settings or ZeroShotEvalConfig()).visdial_caption

    def read(self) -> None:
        self.path = self.root / "visdial" / "visdial_1.0_val.json"
        data = field(json_records(self.path, dict), "data", dict, self.path, None)
        questions = field(data, "questions", list, self.path, "data")
        answers = field(data, "answers", list, self.path, "data")
        for name, texts in (("questions", questions), ("answers", answers)):
            bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
            if bad is not None:
                raise DataError(f"record data.{name}[{bad}]: expected str, got {type(texts[bad]).__name__}",
                                file=str(self.path))
        dialogs = field(data, "dialogs", list, self.path, "data")
        if not dialogs:
            raise DataError("no queries: data.dialogs is empty", file=str(self.path))
        self.dialogs = []
        image_ids = Ids("image_id", self.path)
        for index, dialog in enumerate(dialogs):
            image_id = field(dialog, "image_id", int, self.path, f"dialogs[{index}]")
            image_ids.add(image_id, f"dialogs[{index}]")
            caption = field(dialog, "caption", str, self.path, f"dialogs[{index}]").strip()
            parts = [caption] if self.with_caption else []
            for turn, entry in enumerate(field(dialog, "dialog", list, self.path, f"dialogs[{index}]")):
                where = f"dialogs[{index}].dialog[{turn}]"
                q, a = field(entry, "question", int, self.path, where), field(entry, "answer", int, self.path, where)
                if not (0 <= q < len(questions) and 0 <= a < len(answers)):
                    raise DataError(f"record {where}: question {q} / answer {a} outside the "
                                    f"{len(questions)} questions / {len(answers)} answers", file=str(self.path))
                parts.append(f"Q: {questions[q]}? A: {answers[a]}.")
            image = self.media("visdial", "VisualDialog_val2018", f"VisualDialog_val2018_{image_id:012d}.jpg",
                               where=self.path, record=f"dialogs[{index}]")
            self.dialogs.append((str(image_id), " ".join(parts), image))

    @property
    def is_real_data(self) -> bool:
        return len(self.dialogs) == self.REAL_DIALOGS

    def retrievals(self) -> list[Retrieval]:
        instruction = self.instruction("dialog2i")
        queries = [query_item(f"d{iid}", instruction, text=text) for iid, text, _ in self.dialogs]
        images = [{"id": iid, "image": str(path)} for iid, _, path in self.dialogs]
        name = "visdial-caption-rounds" if self.with_caption else "visdial-rounds"
        return [Retrieval("dialog2i", item_set(name, queries, [self.path]),
                          item_set("visdial-images", images, [self.path]), k=max(self.ks))]

    def score(self, rankings) -> dict[str, float]:
        search = self.retrievals()[0]
        targets = {f"d{iid}": {iid} for iid, _, _ in self.dialogs}
        recall = hit_rates(ranked_ids(rankings, "dialog2i", search.queries), targets, self.ks)
        return {f"R@{k}": value for k, value in recall.items()}
