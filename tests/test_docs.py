"""Documents the package's docstrings point readers to exist in the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_method_notes_named_in_the_code_are_in_the_repository():
    """Docstrings once sent readers to a METHOD.md that the repository does not ship; they now cite the paper and the
    authors' files instead, or the document must be added."""
    shipped = {path.name for path in ROOT.rglob("*.md")}
    mentions = [
        f"{path.relative_to(ROOT)}: {name}"
        for folder in ("src", "examples", "tests", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if path != Path(__file__).resolve()
        for name in re.findall(r"[\w./-]*METHOD\.md", path.read_text())
        if Path(name).name not in shipped
    ]
    assert not mentions, mentions
