"""VisDial v1.0 val: a dialogue (caption and its rounds of questions and answers) -> its image."""
from __future__ import annotations

from umarvel.errors import DataError
from umarvel.evaluation.protocol import Retrieval
from umarvel.evaluation.zeroshot.base import (
    ZeroShotBenchmark,
    field,
    item_set,
    query_item,
    ranked_ids,
    read_json,
    require_file,
)
from umarvel.evaluation.zeroshot.metrics import hit_rates


class VisDial(ZeroShotBenchmark):
    """`visdial/visdial_1.0_val.json` ({"data": {questions, answers, dialogs}}); images
    `visdial/VisualDialog_val2018/VisualDialog_val2018_{image_id:012d}.jpg`.

    The query text is the caption, then every round as "Q: {question}? A: {answer}.".
    """

    name = "visdial"
    ks = (1, 5, 10)
    paper = {"R@1": 70.3}
    REAL_DIALOGS = 2064

    def read(self) -> None:
        self.path = self.root / "visdial" / "visdial_1.0_val.json"
        data = field(read_json(self.path), "data", dict, self.path, None)
        questions = field(data, "questions", list, self.path, "data")
        answers = field(data, "answers", list, self.path, "data")
        self.dialogs = []
        for index, dialog in enumerate(field(data, "dialogs", list, self.path, "data")):
            image_id = field(dialog, "image_id", int, self.path, f"dialogs[{index}]")
            parts = [field(dialog, "caption", str, self.path, f"dialogs[{index}]").strip()]
            for turn, entry in enumerate(field(dialog, "dialog", list, self.path, f"dialogs[{index}]")):
                where = f"dialogs[{index}].dialog[{turn}]"
                q, a = field(entry, "question", int, self.path, where), field(entry, "answer", int, self.path, where)
                if not (0 <= q < len(questions) and 0 <= a < len(answers)):
                    raise DataError(f"record {where}: question {q} / answer {a} outside the "
                                    f"{len(questions)} questions / {len(answers)} answers", file=str(self.path))
                parts.append(f"Q: {questions[q]}? A: {answers[a]}.")
            image = self.root / "visdial" / "VisualDialog_val2018" / f"VisualDialog_val2018_{image_id:012d}.jpg"
            require_file(image, "image", self.path, record=f"dialogs[{index}]")
            self.dialogs.append((str(image_id), " ".join(parts), image))

    @property
    def is_real_data(self) -> bool:
        return len(self.dialogs) == self.REAL_DIALOGS

    def retrievals(self) -> list[Retrieval]:
        instruction = self.instruction("dialog2i")
        queries = [query_item(f"d{iid}", instruction, text=text) for iid, text, _ in self.dialogs]
        images = [{"id": iid, "image": str(path)} for iid, _, path in self.dialogs]
        return [Retrieval("dialog2i", item_set("visdial-dialogs", queries, [self.path]),
                          item_set("visdial-images", images, [self.path]), k=max(self.ks))]

    def score(self, rankings) -> dict[str, float]:
        search = self.retrievals()[0]
        targets = {f"d{iid}": {iid} for iid, _, _ in self.dialogs}
        recall = hit_rates(ranked_ids(rankings, "dialog2i", search.queries), targets, self.ks)
        return {f"R@{k}": value for k, value in recall.items()}
