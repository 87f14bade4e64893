"""Print the data folder `make test` and `make demo` read (the folder that holds glue/), or stop with one message.

Looked for in this order: the folder given on the command line (DATA_DIR or LRSPARSE_DATA_DIR), ../shared/data next
to the repository, the cache ~/.cache/lrsparse/data (LRSPARSE_CACHE), and, when none has GLUE, GLUE (CoLA, MRPC,
SST-2, STS-B) and the SQuAD v1.1 dev set downloaded from the Hugging Face hub with `datasets` into that cache, written
in the original file layout that lrsparse's readers and the tests expect.

    python scripts/find_data.py [DATA_DIR]
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LRSPARSE_CACHE", Path.home() / ".cache" / "lrsparse")) / "data"
HOW_TO_GET_IT = (
    "no GLUE data found. Give make the folder that holds glue/{CoLA,MRPC,SST-2,STS-B}/{train,dev}.tsv "
    "(the layout of GLUE's download_glue_data.py) as DATA_DIR=/path, or put it at ../shared/data, or run once with "
    f"network access and `datasets` installed (make install has it) so that it is downloaded into {CACHE}")
# Header line and row layout of each task's TSV, as GLUE's own files have them (CoLA has no header).
GLUE_FILES = {
    "cola": ("CoLA", None, lambda a, b, y: ["hub", str(y), "", a]),
    "sst2": ("SST-2", ["sentence", "label"], lambda a, b, y: [a, str(y)]),
    "mrpc": ("MRPC", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], lambda a, b, y: [str(y), "0", "0", a, b]),
    "stsb": ("STS-B", ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                       "sentence2", "score"],
             lambda a, b, y: ["0", "hub", "hub", "hub", "0", "none", "none", a, b, f"{y:.3f}"]),
}
HUB_TEXT = {"cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
            "stsb": ("sentence1", "sentence2")}


def has_glue(folder: Path) -> bool:
    return all((folder / "glue" / name / "dev.tsv").is_file() for name, _, _ in GLUE_FILES.values())


def clean(text: str) -> str:
    """A field as the TSV readers take it: no tab or line break inside (they read with quoting off)."""
    return " ".join(text.split())


def download(cache: Path) -> None:
    import datasets

    staging = cache.with_name(cache.name + ".partial")  # a download cut off halfway never looks like data
    for task, (folder, header, layout) in GLUE_FILES.items():
        (staging / "glue" / folder).mkdir(parents=True, exist_ok=True)
        first, second = HUB_TEXT[task]
        for split, hub_split in (("train", "train"), ("dev", "validation")):
            rows = datasets.load_dataset("nyu-mll/glue", task, split=hub_split)
            lines = ["\t".join(header)] if header else []
            for row in rows:
                lines.append("\t".join(layout(clean(row[first]), clean(row[second]) if second else "", row["label"])))
            (staging / "glue" / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    articles: dict[str, dict] = {}
    for row in datasets.load_dataset("rajpurkar/squad", split="validation"):
        article = articles.setdefault(row["title"], {"title": row["title"], "paragraphs": []})
        if not article["paragraphs"] or article["paragraphs"][-1]["context"] != row["context"]:
            article["paragraphs"].append({"context": row["context"], "qas": []})
        answers = [{"text": t, "answer_start": s} for t, s in zip(row["answers"]["text"],
                                                                 row["answers"]["answer_start"])]
        article["paragraphs"][-1]["qas"].append({"id": row["id"], "question": row["question"], "answers": answers})
    (staging / "squad").mkdir(parents=True, exist_ok=True)
    (staging / "squad" / "dev-v1.1.json").write_text(json.dumps({"version": "1.1", "data": list(articles.values())}))
    staging.rename(cache)


def find(given: str | None) -> Path:
    if given:  # an explicit folder is used as it is: a wrong path is an error, not a reason to look elsewhere
        if has_glue(Path(given)):
            return Path(given).resolve()
        raise SystemExit(f"DATA_DIR={given} has no glue/ folder; " + HOW_TO_GET_IT)
    for folder in (REPO.parent / "shared" / "data", CACHE):
        if has_glue(folder):
            return folder.resolve()
    try:
        print(f"find_data: downloading GLUE and SQuAD dev from the hub into {CACHE}", file=sys.stderr)
        download(CACHE)
    except Exception as exc:  # offline, no `datasets`, hub errors: all mean the same to the user
        raise SystemExit(f"{HOW_TO_GET_IT} (the download failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return CACHE.resolve()


if __name__ == "__main__":
    print(find(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None))
