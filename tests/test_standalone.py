"""The repository stands alone: nothing it tracks points outside itself.

The project once kept its design notes, reference values and test data in a folder beside
the repository. A clone does not have that folder, so no tracked file may rely on it: the
notes are now docs/*.md and the data tests/data/.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not match itself.
_OUTSIDE = [
    re.escape(".." + "/shared"),
    r"(?<![\w.-])" + "shared" + r"/(?:data|reference|paper|tools|hooks)\b",
    re.escape("DESIGN" + ".md"),
    re.escape("fdg_values" + ".md"),
    re.escape("slurm_local" + ".md"),
    re.escape("paper" + "/de_benetti"),
]
OUTSIDE = re.compile("|".join(_OUTSIDE))
DOC_LINK = re.compile(r"\bdocs/[\w-]+\.md\b")


def tracked_text_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, names):
        path = ROOT / name.decode()
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data[:4096]:  # binary (pictures, gzipped NIfTI)
            continue
        yield path, data.decode("utf-8", errors="replace")


def test_no_tracked_file_points_outside_the_repository():
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path, text in tracked_text_files()
        for n, line in enumerate(text.splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_every_cited_docs_page_exists():
    cited = {
        (m.group(0), path.relative_to(ROOT))
        for path, text in tracked_text_files()
        for m in DOC_LINK.finditer(text)
    }
    missing = sorted(
        f"{page} (cited in {where})" for page, where in cited if not (ROOT / page).exists()
    )
    assert cited and not missing, missing


def test_test_data_carry_their_licence_and_source():
    folders = [d for d in (ROOT / "tests" / "data").iterdir() if d.is_dir()]
    assert folders
    for folder in folders:
        assert any(folder.glob("LICENSE*")), f"{folder} has no LICENSE file"
        assert (folder / "README.md").is_file(), f"{folder} has no README.md naming its source"
