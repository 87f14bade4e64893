"""The quality report's variant comparison (benchmarks/quality.py) against numpy's mean and sample std."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402  (benchmarks/ is not a package)


def row(task, main, seed, variant="", preset="lpaf", keep=0.25):
    epochs = {"dense": 3.0} if preset == "dense" else dict(quality.DEFAULT_EPOCHS)
    return {"task": task, "preset": preset, "keep": keep, "seed": seed, "main": main, "epochs": epochs,
            "train_examples": 100, "minutes": 1.0, "degenerate": False,
            **({"variant": variant} if variant else {})}


def table(lines):
    """The comparison table's rows as {(task, variant): [cells]}."""
    cells = [line.strip("|").split(" | ") for line in lines if line.startswith("| ") and "---" not in line]
    return {(c[0].strip(), c[2].strip()): [x.strip() for x in c] for c in cells[1:]}


def test_verdicts_follow_the_larger_sample_std():
    lpaf = [0.850, 0.860, 0.855]
    no_mixed = [0.830, 0.835, 0.825]   # loses ~2.5 points, spreads 0.5: more than 1 std
    noisy = [0.820, 0.880, 0.850]      # loses 0.2 with a 3-point spread: inside the noise
    better = [0.900, 0.905, 0.910]     # gains
    rows = ([row("mrpc", v, s) for s, v in enumerate(lpaf)]
            + [row("mrpc", v, s, "no-mixed") for s, v in enumerate(no_mixed)]
            + [row("mrpc", v, s, "noisy") for s, v in enumerate(noisy)]
            + [row("mrpc", v, s, "better") for s, v in enumerate(better)]
            + [row("mrpc", 0.5, 0, preset="svd")])
    got = table(quality.variant_comparison(rows))
    assert set(got) == {("mrpc", "lpaf+no-mixed"), ("mrpc", "lpaf+noisy"), ("mrpc", "lpaf+better")}
    for variant, values, verdict in (("no-mixed", no_mixed, "loses more than 1 std"),
                                     ("noisy", noisy, "inside the noise"), ("better", better, "gains more than 1 std")):
        cells = got[("mrpc", f"lpaf+{variant}")]
        loss = 100 * (np.mean(lpaf) - np.mean(values))
        spread = 100 * max(np.std(lpaf, ddof=1), np.std(values, ddof=1))
        assert float(cells[7]) == pytest.approx(loss, abs=0.051)
        assert float(cells[8]) == pytest.approx(spread, abs=0.051)
        assert cells[9] == verdict
        assert cells[3] == "3" and cells[5] == "3"
        paired = [float(item.split(": ")[1]) for item in cells[10].split(", ")]
        assert paired == pytest.approx(100 * (np.array(lpaf) - np.array(values)), abs=0.051)


def test_too_few_seeds_and_missing_reference_are_said_not_judged():
    rows = ([row("stsb", 0.85, 0), row("stsb", 0.86, 1)]
            + [row("stsb", 0.80, 0, "no-prune"), row("stsb", 0.81, 1, "no-prune")]
            + [row("cola", 0.2, 0), row("cola", 0.1, 0, "no-prune")]
            + [row("mrpc", 0.8, 0, "no-prune")])  # no plain lpaf on mrpc: nothing to compare with
    got = table(quality.variant_comparison(rows))
    assert set(got) == {("stsb", "lpaf+no-prune"), ("cola", "lpaf+no-prune")}
    assert got[("stsb", "lpaf+no-prune")][9] == "loses more than 1 std (n < 3)"
    assert got[("cola", "lpaf+no-prune")][9] == "no spread (n < 2)"
    assert quality.variant_comparison([row("mrpc", 0.8, 0)]) == []


def test_keeps_and_precisions_are_compared_only_with_their_own_kind():
    rows = [row("mrpc", 0.85, s) for s in range(2)] + [row("mrpc", 0.80, s, keep=0.5) for s in range(2)]
    rows += [dict(row("mrpc", 0.70, s, "no-mixed", keep=0.5), precision="bf16") for s in range(2)]
    assert quality.variant_comparison(rows) == []  # the bf16 variant has no bf16 lpaf at keep 0.5


def test_runs_of_another_training_budget_are_other_measurements(tmp_path):
    """A dense model trained 6 epochs is not the 3-epoch grid's dense run of the same seed: merging keeps both, the
    tables and labels tell them apart, and their run folders differ."""
    grid = row("cola", 0.27, 0, preset="dense", keep=1.0)
    longer = dict(grid, main=0.29, epochs={"dense": 6.0})
    lpaf = row("cola", 0.23, 0)
    results = quality.Results(tmp_path / "quality")
    results.majority = {"cola": 0.0}
    for r in (grid, lpaf):
        results.add(dict(r), render=False)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"majority": {"cola": 0.0}, "rows": [dict(longer, degenerate=False),
                                                                      dict(grid, main=0.5, degenerate=False)]}))
    assert results.merge(other) == 1  # the 6-epoch run is new; the 3-epoch seed 0 is already there
    assert [r["main"] for r in results.rows] == [0.27, 0.23, 0.29]
    assert [quality.method(r) for r in results.rows] == ["dense", "lpaf", "dense (6 epochs)"]
    markdown = quality.to_markdown(results.majority, results.rows)
    assert "| dense | 1.0 | 1 | 27.0 (1 seed) |" in markdown
    assert "| dense (6 epochs) | 1.0 | 1 | 29.0 (1 seed) |" in markdown
    assert quality.budget_suffix({"dense": 3.0}) == "" and quality.budget_suffix(quality.DEFAULT_EPOCHS) == ""
    assert quality.budget_suffix({"dense": 6.0}) == "-e-dense6"
    assert quality.budget_suffix({"dense": 3.0, "prune": 10.0, "mixed": 2.0}) == "-e-prune10"


def test_rows_name_the_package_versions_they_ran_with():
    """Each row's ``software`` matches what the packages report about themselves, and the extension's build."""
    import lrsparse
    import numpy
    import scipy
    import tokenizers
    import transformers

    versions = quality.software()
    assert versions == {"lrsparse_extension": dict(lrsparse.BUILD_INFO), "transformers": transformers.__version__,
                        "tokenizers": tokenizers.__version__, "numpy": numpy.__version__,
                        "scipy": scipy.__version__}


def test_machine_names_the_vector_isa_and_its_overrides(monkeypatch):
    """The machine string ends with ATen's ISA as torch reports it, plus each override set in the environment (an
    AVX2 run on an AVX-512 host rounds like the AVX2 host, not like its own CPU)."""
    import torch

    for name in ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    plain = f"ATen CPU {torch.backends.cpu.get_cpu_capability()}"
    assert quality.machine().endswith(", " + plain)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert quality.machine().endswith(f", {plain} (DNNL_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2)")


def test_the_report_names_the_results_file_it_was_rendered_from(tmp_path):
    """A results file other than quality.json (e.g. quality_same_host) renders a report that points at itself."""
    results = quality.Results(tmp_path / "quality_same_host")
    results.majority = {"cola": 0.0}
    results.add(row("cola", 0.23, 0))  # renders the markdown and the plot
    markdown = (tmp_path / "quality_same_host.md").read_text()
    assert "every row of `quality_same_host.json` holds" in markdown and "`quality.json`" not in markdown


def test_processes_sharing_a_results_file_lose_no_rows(tmp_path):
    """Two invocations that read quality.json before either finished a run: each save first adds what the other
    wrote, so the file ends with both runs (a plain rewrite of what each process read would keep only the last)."""
    out = tmp_path / "quality"
    first, second = quality.Results(out), quality.Results(out)
    for results in (first, second):
        results.majority = {"cola": 0.0}
    first.add(row("cola", 0.25, 0), render=False)
    second.add(row("cola", 0.21, 1), render=False)
    first.add(row("cola", 0.22, 2), render=False)
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert sorted((r["seed"], r["main"]) for r in saved["rows"]) == [(0, 0.25), (1, 0.21), (2, 0.22)]
    assert sorted(r["seed"] for r in quality.Results(out).rows) == [0, 1, 2]
    assert saved["majority"] == {"cola": 0.0}


def test_weights_digest_tells_last_bit_differences_and_ignores_file_metadata(tmp_path):
    """Two checkpoints of the same tensors (other file metadata, other key order) share a digest; one float moved by
    a single ulp changes it (a dev score cannot tell those apart)."""
    import torch
    from safetensors.torch import save_file

    tensors = {"b.weight": torch.randn(4, 3), "a.bias": torch.randn(3)}
    for name, metadata in (("first", {"format": "pt"}), ("second", {"format": "pt", "note": "resaved"})):
        (tmp_path / name).mkdir()
        save_file(dict(reversed(list(tensors.items()))) if name == "second" else tensors,
                  str(tmp_path / name / "model.safetensors"), metadata=metadata)
    nudged = {k: v.clone() for k, v in tensors.items()}
    nudged["b.weight"][2, 1] = torch.nextafter(nudged["b.weight"][2, 1], torch.tensor(float("inf")))
    (tmp_path / "nudged").mkdir()
    save_file(nudged, str(tmp_path / "nudged" / "model.safetensors"))
    first, second, third = (quality.weights_digest(tmp_path / n) for n in ("first", "second", "nudged"))
    assert first == second and first != third and len(first) == 16


def test_rows_keep_each_stage_cost_from_the_report():
    """A distilled stage keeps its seconds and the teacher's share and memory; a stage without a teacher has none."""
    pruned = {"name": "prune", "metrics": {"matthews_corr": 0.26, "main": 0.26}, "seconds": 795.7, "steps": 804,
              "mean_loss": 0.21, "teacher": "dense", "teacher_seconds": 157.6, "teacher_bytes": 90855944}
    factorized = {"name": "factorize", "metrics": {"main": 0.21}, "seconds": 12.5}
    assert quality.stage_summary(pruned) == {"name": "prune", "main": 0.26, "seconds": 795.7,
                                             "teacher_seconds": 157.6, "teacher_bytes": 90855944}
    assert quality.stage_summary(factorized) == {"name": "factorize", "main": 0.21, "seconds": 12.5}
