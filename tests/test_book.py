"""The book: lessons paired with their notebooks, and the built HTML (`make book`).

The source checks run everywhere. The HTML checks need `_build/html` from `make book`:
`.ci/run` builds the book first (with a fake token planted in HF_TOKEN), so in CI a missing
build is a failure, not a skip.
"""
import os
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
FAKE_TOKEN = "hf_socraticLoraFakeTokenForTheBookBuild0"   # .ci/run plants it in HF_TOKEN
TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{30,}")
LOCAL_PATH = re.compile(r"(?<![\w.:/-])/(?:work|home|root|tmp|Users|opt|usr/local|var/folders)/[\w.-]")


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    out = [toc["root"]]
    for part in toc["parts"]:
        out += [c["file"] for c in part["chapters"]]
    return out


LESSONS = [f for f in toc_files() if f.startswith("lessons/")]


def test_every_toc_entry_exists():
    missing = [f for f in toc_files() if not (ROOT / f"{f}.md").is_file()]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"
    assert len(LESSONS) == 12


@pytest.mark.parametrize("lesson", LESSONS)
def test_notebook_pair_is_in_sync(lesson):
    """lessons/X.md and lessons/X.ipynb hold the same cells (`jupytext --sync` keeps them so)."""
    import jupytext
    md, ipynb = ROOT / f"{lesson}.md", ROOT / f"{lesson}.ipynb"
    assert ipynb.is_file(), f"{ipynb.name} missing: run `jupytext --sync {lesson}.md`"
    a, b = jupytext.read(md), jupytext.read(ipynb)

    def cells(nb):
        return [(c.cell_type, c.source.strip()) for c in nb.cells]
    assert cells(a) == cells(b), (f"{lesson}.md and .ipynb differ: run `jupytext --sync {lesson}.md`")
    assert all(not c.get("outputs") for c in b.cells if c.cell_type == "code"), \
        f"{ipynb.name} carries outputs: clear them (the book shows executed outputs)"


@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_source_follows_the_pattern(lesson):
    text = (ROOT / f"{lesson}.md").read_text(encoding="utf-8")
    code_cells = len(re.findall(r"^```\{code-cell\}", text, re.M))
    dropdowns = len(re.findall(r"^:{3,}\{dropdown\}|^```\{dropdown\}|:class: dropdown", text, re.M))
    assert code_cells >= 2, f"{lesson}: no code"
    assert dropdowns >= code_cells, f"{lesson}: {code_cells} code cells but {dropdowns} dropdowns"
    assert "USE_GPU_MODEL = False" in text, f"{lesson}: the one switch is missing"
    assert "このレッスンで学ぶこと" in text, f"{lesson}: learning goals missing"
    assert not re.search(r"\btorch_dtype\s*=|\btokenizer\s*=\s*tok\b", text), \
        f"{lesson}: transformers 4.x spelling (use dtype= / processing_class=)"


def _html(page: str) -> str:
    path = HTML / f"{page}.html"
    if not HTML.is_dir():
        if os.environ.get("CI"):
            pytest.fail("_build/html is missing: .ci/run must run `make book` before the tests")
        pytest.skip("the book is not built here: run `make book` first")
    assert path.is_file(), f"{path} missing from the build"
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("lesson", LESSONS)
def test_built_lesson_page(lesson):
    html = _html(lesson)
    inputs = html.count('class="cell_input')
    outputs = html.count('class="cell_output')
    dropdowns = html.count("sd-dropdown") + len(re.findall(r'class="admonition[^"]*\bdropdown', html))
    assert inputs >= 2, f"{lesson}: no code cells in the page"
    assert outputs >= 1, f"{lesson}: no executed output in the page"
    assert dropdowns >= inputs, f"{lesson}: {inputs} code cells but {dropdowns} dropdowns"
    colab = f"https://colab.research.google.com/github/socratic-lora/socratic-lora/blob/main/{lesson}.ipynb"
    assert colab in html, f"{lesson}: no Colab launch link to {lesson}.ipynb"
    assert "このページの出力を作ったモデル" in html, f"{lesson}: the page does not say which model ran it"


def test_built_book_has_no_local_path_or_token():
    _html("intro")
    hits = []
    for path in HTML.rglob("*"):
        if path.suffix not in (".html", ".ipynb", ".txt", ".md", ".js", ".json") or not path.is_file():
            continue
        if path.suffix == ".js" and "_static" in path.parts:
            continue     # theme bundles, not ours
        text = path.read_text(encoding="utf-8", errors="replace")
        for rx in (LOCAL_PATH, TOKEN_LIKE):
            hits += [f"{path.relative_to(HTML)}: {m.group(0)}" for m in rx.finditer(text)]
        if FAKE_TOKEN in text:
            hits.append(f"{path.relative_to(HTML)}: the planted token")
    assert not hits, "the built book leaks:\n" + "\n".join(hits[:20])


def test_planted_token_is_nowhere_on_disk():
    """The book build ran with FAKE_TOKEN in HF_TOKEN: nothing it wrote may contain it."""
    _html("intro")
    hits = []
    for base in (ROOT / "_build", ROOT / "lessons", ROOT / "runs"):
        for path in base.rglob("*") if base.exists() else ():
            if path.is_file() and path.stat().st_size < 50_000_000:
                if FAKE_TOKEN.encode() in path.read_bytes():
                    hits.append(str(path.relative_to(ROOT)))
    assert not hits, f"the planted token was written to: {hits}"
