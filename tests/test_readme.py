"""The README's backend example is examples/ramdisk.py, as is."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_is_the_served_example() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = (ROOT / "examples" / "ramdisk.py").read_text()
    code = example[example.index("from abuse import") :]
    assert code in blocks
    assert len(code.splitlines()) < 30
