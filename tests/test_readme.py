"""The README starts with install + demo and the tests; CI runs exactly its install and test commands."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_install_and_test_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    install, demo = blocks[0].strip().splitlines()[:2]
    test = blocks[1].strip()
    assert demo.startswith("umarvel demo")
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [install, test]
