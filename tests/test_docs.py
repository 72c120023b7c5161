"""Every ```python block in docs/ runs as it is."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent


def blocks() -> List[Tuple[str, str]]:
    out = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            out.append((f"{page.name}#{i + 1}", code))
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,code", blocks(), ids=[b[0] for b in blocks()])
def test_doc_example_runs(name: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=50, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
