"""The documentation against what it documents: the rendered tables against benchmarks/results/*.json (through
benchmarks/render_docs.py), every `--flag` of an `lrsparse <subcommand>` command line shown in a code block against
that subcommand's parser, and every relative link (and its #anchor) against the files and headings it points at.

Each check is also run on a small broken document, so that a checker that finds nothing cannot pass unnoticed."""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import pytest

import lrsparse.cli

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import render_docs  # noqa: E402

DOCUMENTS = [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "benchmarks" / "README.md",
             *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}  # a ```text block shows output, not commands
COMMAND = re.compile(r"(?:^|[\s;&|(])(?:lrsparse|python -m lrsparse\.cli|\S*python\S* -m lrsparse\.cli)\s+(\S+)(.*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---- 1. rendered tables ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", DOCUMENTS, ids=doc_id)
def test_rendered_tables_match_their_results_files(path):
    stale = render_docs.stale_blocks(path)
    assert not stale, f"{doc_id(path)}: {stale} differ from benchmarks/results; run python benchmarks/render_docs.py"


def test_readme_shows_the_quality_table_early():
    text = (REPO / "README.md").read_text()
    assert len(text) <= 15_000, f"README.md has {len(text)} characters, more than 15,000"
    start = text.index("<!-- render:quality-table -->")
    assert text.index("| task (metric)", start) < 6_000, "the results table must start in the README's first 6,000"
    assert "make test" in text and "make demo" in text


def test_a_tampered_table_is_found(tmp_path):
    page = tmp_path / "page.md"
    fresh = render_docs.render("x\n<!-- render:keeps-table -->\n<!-- /render:keeps-table -->\n")
    page.write_text(fresh)
    assert render_docs.stale_blocks(page) == []
    page.write_text(fresh.replace("lpaf − svd", "lpaf - svd"))
    assert render_docs.stale_blocks(page) == ["keeps-table"]


def test_an_unknown_block_is_an_error():
    with pytest.raises(KeyError, match="no-such-table"):
        render_docs.render("<!-- render:no-such-table -->\n<!-- /render:no-such-table -->\n")


# ---- 2. command-line flags ------------------------------------------------------------------------------------------

def subcommand_flags() -> dict[str, set[str]]:
    parser = lrsparse.cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {flag for action in sub._actions for flag in action.option_strings}
            for name, sub in subparsers.choices.items()}


def command_lines(text: str) -> list[str]:
    """The `lrsparse <subcommand> ...` command lines in the Markdown shell code blocks, continuation lines joined and
    comments dropped."""
    lines = []
    for language, block in FENCE.findall(text):
        if language.strip() not in SHELL_BLOCKS:
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0]
            match = COMMAND.search(line)
            if match:
                lines.append(match.group(1) + match.group(2))
    return lines


def unknown_flags(text: str, known: dict[str, set[str]]) -> list[str]:
    problems = []
    for line in command_lines(text):
        words = shlex.split(line, comments=True)
        subcommand, arguments = words[0], re.split(r"[|;&]", " ".join(words[1:]))[0].split()
        if subcommand not in known:
            problems.append(f"`lrsparse {subcommand}`: no such subcommand")
            continue
        problems += [f"`lrsparse {subcommand} {word}`: not in its --help" for word in arguments
                     if word.startswith("--") and word.split("=", 1)[0] not in known[subcommand]]
    return problems


@pytest.mark.parametrize("path", DOCUMENTS, ids=doc_id)
def test_documented_flags_exist(path):
    problems = unknown_flags(path.read_text(), subcommand_flags())
    assert not problems, f"{doc_id(path)}: " + "; ".join(problems)


def test_the_documents_show_command_lines():
    shown = [line for path in DOCUMENTS for line in command_lines(path.read_text())]
    assert {line.split()[0] for line in shown} >= {"compress", "inspect", "evaluate", "export"}


def test_an_unknown_flag_is_found():
    text = "```bash\nlrsparse compress --task sst2 \\\n    --no-such-flag 3   # --also-not-checked\n" \
           "lrsparse evaluate --model m --task sst2 | tee --append log\n```\n" \
           "```text\nlrsparse run: task sst2 --output-only\n```\n"
    assert unknown_flags(text, subcommand_flags()) == ["`lrsparse compress --no-such-flag`: not in its --help"]


# ---- 3. relative links ----------------------------------------------------------------------------------------------

def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the Markdown headings of ``text`` (lowercase, punctuation dropped, spaces to hyphens)."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", FENCE.sub("", text), re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def broken_links(path: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", path.read_text()))  # links inside code are not links
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            problems.append(f"{target}: no heading with that anchor")
    return problems


@pytest.mark.parametrize("path", DOCUMENTS, ids=doc_id)
def test_relative_links_resolve(path):
    problems = broken_links(path)
    assert not problems, f"{doc_id(path)}: " + "; ".join(problems)


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## The factorizer (`--factorization`)\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#the-factorizer---factorization) [gone](missing.md) "
                    "[bad anchor](other.md#nowhere) [web](https://example.org/x) `[in code](missing.md)`\n")
    assert broken_links(page) == ["missing.md: no such file", "other.md#nowhere: no heading with that anchor"]


def test_the_readme_python_api_block_runs_as_written(tmp_path, monkeypatch):
    """The README's loop, pasted as it is, around a tiny BERT and its batches: it prunes, factorizes with the
    calibration it gathered itself, converts, saves and loads a low-rank model."""
    import torch

    from lrsparse.layers import LowRankLinear
    from pipeline_helpers import random_batches, tiny_bert

    text = (REPO / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    model = tiny_bert()
    loader = random_batches(6, batch=4)
    namespace = {"model": model, "loader": loader, "steps": len(loader), "tokenizer": None, "torch": torch,
                 "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3)}
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md (Python API)", "exec"), namespace)  # noqa: S102 (the documented code itself)
    loaded = namespace["model"]
    assert loaded is not model and sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == 12
    assert (tmp_path / "out" / "model.safetensors").is_file()
