"""Write the tables of numbers into README.md, docs/*.md and benchmarks/README.md from benchmarks/results/*.json.

A document marks each generated table with a pair of lines,

    <!-- render:quality-table -->
    ... (written by this script; edits are overwritten)
    <!-- /render:quality-table -->

and this script replaces what lies between them with the table the results files give now, so a number in the
documentation cannot drift from its results file. `--check` writes nothing and exits 1 when a document differs
(tests/test_docs.py runs it); without it the documents are rewritten in place.

    python benchmarks/render_docs.py            # after a results file changed
    python benchmarks/render_docs.py --check
"""
from __future__ import annotations

import argparse
import re
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # doc_tables*, when run from elsewhere or imported by tests

import doc_tables as quality  # noqa: E402
import doc_tables_runs as runs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(?P<open><!-- render:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(?P<close><!-- /render:(?P=name) -->)",
                   re.S)

RENDERERS = {
    "quality-table": quality.quality_table,
    "ablation-table": quality.ablation_table,
    "keeps-table": quality.keeps_table,
    "converged-table": quality.converged_table,
    "targets-table": quality.targets_table,
    "quality-hosts-table": quality.hosts_table,
    "stage-times-table": quality.stage_times_table,
    "stages-table": quality.stages_table,
    "glance-table": runs.glance_table,
    "machines-table": runs.machines_table,
    "embedding-table": runs.embedding_table,
    "embedding-hidden-table": runs.embedding_hidden_matching,
    "factorizers-dense-table": partial(runs.factorizers_table, "factorization_cola_dense.json"),
    "factorizers-pruned-table": partial(runs.factorizers_table, "factorization_cola_pruned.json"),
    "inference-table": runs.inference_table,
    "inference-cuda-table": partial(runs.inference_table, "gpu/inference_cuda.json"),
    "training-table": runs.training_table,
    "ops-table": runs.ops_table,
    "ops-weighted-lowrank-table": partial(runs.ops_table, "ops_cpu_weighted_lowrank.json"),
    "distributed-table": runs.distributed_table,
    "own-data-table": runs.own_data_table,
}


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "benchmarks" / "README.md"]


def render(text: str) -> str:
    """``text`` with every marked block's body replaced by its table; an unknown block name is an error."""
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"unknown render block {name!r}; known: {', '.join(sorted(RENDERERS))}")
        return match["open"] + RENDERERS[name]().rstrip("\n") + "\n" + match["close"]
    return BLOCK.sub(replace, text)


def stale_blocks(path: Path) -> list[str]:
    """The names of the blocks in ``path`` whose text differs from what :func:`render` writes now."""
    text = path.read_text()
    fresh = {m["name"]: m["body"] for m in BLOCK.finditer(render(text))}
    return [m["name"] for m in BLOCK.finditer(text) if fresh[m["name"]] != m["body"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a document is stale")
    args = parser.parse_args(argv)
    stale = 0
    for path in documents():
        if not path.exists():
            continue
        if args.check:
            for name in stale_blocks(path):
                print(f"{path.relative_to(ROOT)}: block {name} differs from its results file "
                      "(run python benchmarks/render_docs.py)")
                stale += 1
        else:
            text = path.read_text()
            if render(text) != text:
                path.write_text(render(text))
                print(f"rendered {path.relative_to(ROOT)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
