"""Progress off a terminal: plain periodic lines, never tqdm's carriage-return fragments."""
from __future__ import annotations

import logging
import subprocess
import sys

from umarvel import progress


def test_redirected_progress_is_periodic_lines(monkeypatch, caplog):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="umarvel"):
        with progress.progress_bar(4, "encode queries", "item") as bar:
            for _ in range(4):
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("encode queries: 1/4 item (25%) | ") and "ETA" in lines[0]
    assert len(lines) == 4 and lines[-1].startswith("encode queries: 4/4 item (100%)") and "took" in lines[-1]


def test_lines_wait_for_the_interval(monkeypatch, caplog):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="umarvel"):
        quick = progress.progress_bar(100, "quick", "pair", line_seconds=3600)
        quick.update(100)
        quick.close()  # done within QUIET_SECONDS: no line
        monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
        bar = progress.progress_bar(100, "rerank", "pair", line_seconds=3600)
        for _ in range(100):
            bar.update(1)
        bar.close()
        progress.progress_bar(5, "unused", "pair").close()  # nothing done: no line
        progress.progress_bar(5, "off", "pair", enabled=False).update(5)
    assert [r.getMessage().split(" |")[0] for r in caplog.records] == ["rerank: 100/100 pair (100%)"]


def test_a_redirected_search_writes_no_carriage_returns(tmp_path):
    """The library's own loops, stderr a file: lines, no `\\r` fragments (a real child process,
    so stderr is really not a terminal)."""
    code = (
        "import logging, numpy as np\n"
        "from umarvel import progress\n"
        "from umarvel.retrieval.index import search\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "progress.LINE_SECONDS = 0.0\n"
        "rng = np.random.default_rng(0)\n"
        "search(rng.standard_normal((3, 8), dtype=np.float32), rng.standard_normal((50, 8), dtype=np.float32), 2,\n"
        "       use_gpu=False, progress=True, chunk_size=10)\n"
    )
    err = tmp_path / "stderr.txt"
    with open(err, "w") as handle:
        subprocess.run([sys.executable, "-c", code], stderr=handle, check=True)
    text = err.read_text()
    assert "\r" not in text
    assert text.count("search 3 queries: ") == 5 and "50/50 cand (100%)" in text


def test_library_bars_are_off_when_redirected(monkeypatch):
    from transformers.utils import logging as transformers_logging

    hub = sys.modules["huggingface_hub"]  # imported by transformers, not a dependency of ours

    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    try:
        progress.quiet_library_bars()
        assert not transformers_logging.is_progress_bar_enabled()
        assert progress.os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert hub.utils.are_progress_bars_disabled()
    finally:
        transformers_logging.enable_progress_bar()
        hub.utils.enable_progress_bars()


def test_lines_reach_stderr_when_logging_is_not_set_up(tmp_path):
    """An API caller who asks for progress off a terminal and configured no logging still sees it."""
    code = ("from umarvel import progress\n"
            "progress.LINE_SECONDS = 0.0\n"
            "with progress.progress_bar(2, 'encode', 'item') as bar:\n"
            "    bar.update(1)\n"
            "    bar.update(1)\n")
    err = tmp_path / "stderr.txt"
    with open(err, "w") as handle:
        subprocess.run([sys.executable, "-c", code], stderr=handle, check=True)
    assert err.read_text().splitlines()[-2:][0].startswith("encode: 1/2 item (50%) | ")
    assert err.read_text().splitlines()[-1].startswith("encode: 2/2 item (100%) | ")
