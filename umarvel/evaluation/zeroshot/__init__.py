"""The paper's zero-shot suite (Tables 8 and 9): one Benchmark per set, read from the layout of
its public release under one data root (README, "Zero-shot evaluation").

`TASKS` maps each task name (the CLI's `--task`) to its class, constructed as
`cls(data_root, settings, symlinks_outside_root=...)` (data.allow_symlinks_outside_root); the
shared runner encodes, searches and reports.
"""
from __future__ import annotations

from umarvel.evaluation.protocol import Benchmark
from umarvel.evaluation.zeroshot.captions import MSCOCO, Flickr, ShareGPT4V, Urban1K
from umarvel.evaluation.zeroshot.composed import CIRCO, GeneCIS, MultiTurnFashionIQ
from umarvel.evaluation.zeroshot.dialog import VisDial
from umarvel.evaluation.zeroshot.matching import CCNeg, SugarCrepe
from umarvel.evaluation.zeroshot.videos import MSRVTT, MSVD

TASKS: dict[str, type[Benchmark]] = {
    cls.name: cls
    for cls in (ShareGPT4V, Urban1K, Flickr, MSCOCO, CIRCO, GeneCIS, VisDial, MultiTurnFashionIQ, CCNeg, SugarCrepe,
                MSRVTT, MSVD)
}
