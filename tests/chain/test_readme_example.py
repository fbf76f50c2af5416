"""The README's chain example runs as printed (in a fresh interpreter) and prints what its comment says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_chain_example_runs() -> None:
    text = README.read_text()
    section = text[text.index("## Pay and punish on a chain") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None, "the README's chain section lost its python example"
    done = subprocess.run([sys.executable, "-c", code.group(1)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    promised = re.search(r"print\(.*\)\s*#\s*(.+)\n", code.group(1))
    assert promised is not None
    assert done.stdout.strip() == promised.group(1).strip()
