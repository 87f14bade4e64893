"""report.png: plot_report, `lrsparse inspect --plot`, and the guarded call at the end of a compression run."""
from __future__ import annotations

import json
import logging
import sys

import pytest

from lrsparse import pipeline
from lrsparse.cli import main
from lrsparse.report import plot_report, report_figure, validate_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hand_built_report() -> dict:
    layers = [
        {"name": f"bert.encoder.layer.{i}.{proj}", "in_features": n_in, "out_features": n_out, "density": density,
         "rank": rank, "method": "sparsity-aware", "relative_error": 0.1}
        for i, (density_base, rank_base) in enumerate(((0.3, 8), (0.2, 4)))
        for proj, n_in, n_out, density, rank in (
            ("attention.self.query", 32, 32, density_base, rank_base),
            ("intermediate.dense", 32, 64, density_base + 0.1, rank_base * 2),
            ("output.dense", 64, 32, density_base - 0.1, rank_base + 1),
        )
    ]
    stages = [{"name": name, "seconds": 1.5, "steps": 4, "metrics": {"accuracy": main, "main": main}}
              for name, main in (("dense", 0.91), ("prune", 0.88), ("factorize", 0.52), ("mixed_rank", 0.87))]
    report = {
        "format_version": 1, "task": "sst2", "method": "lpaf", "keep": 0.25, "seed": 0, "model": "tiny",
        "factorization": "sparsity-aware", "versions": {"lrsparse": "0", "torch": "2", "transformers": "5"},
        "final_metrics": dict(stages[-1]["metrics"]), "stages": stages,
        "params": {"target_dense": 1000, "target_compressed": 250, "non_embedding_dense": 1200,
                   "non_embedding_compressed": 450, "total_dense": 5000, "total_compressed": 4250},
        "layers": layers, "checkpoint_bytes": 12345,
    }
    return validate_report(report)


def assert_png(path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) >= min_bytes  # four panels of bars and labels; an empty canvas compresses to far less


def bar_heights(ax) -> list[float]:
    return [patch.get_height() for patch in ax.patches]


def test_plot_report_writes_a_png(tmp_path):
    path = plot_report(hand_built_report(), tmp_path / "nested" / "report.png")
    assert path == tmp_path / "nested" / "report.png"
    assert_png(path)
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    assert (width, height) == (800, 1000)  # figsize 8 x 10 inches at 100 dpi for 6 layers


def test_figure_shows_density_rank_rank_fraction_and_stage_metric():
    report = hand_built_report()
    density, rank, fraction, stage = report_figure(report).axes
    layers = report["layers"]
    assert bar_heights(density) == pytest.approx([layer["density"] for layer in layers])
    assert bar_heights(rank) == [layer["rank"] for layer in layers]
    assert bar_heights(fraction) == pytest.approx(
        [layer["rank"] / min(layer["in_features"], layer["out_features"]) for layer in layers])
    assert bar_heights(fraction)[1] == pytest.approx(16 / 32)  # intermediate.dense 32 -> 64 at rank 16
    assert bar_heights(stage) == pytest.approx([0.91, 0.88, 0.52, 0.87])
    assert [t.get_text() for t in stage.get_xticklabels()] == ["dense", "prune", "factorize", "mixed_rank"]
    assert [t.get_text() for t in density.get_xticklabels()][:2] == ["0.attention.self.query",
                                                                     "0.intermediate.dense"]


def test_plot_report_rejects_an_invalid_report(tmp_path):
    report = hand_built_report()
    del report["stages"][1]["metrics"]["main"]
    with pytest.raises(ValueError, match=r"stages\[1\]\.metrics\. is missing key 'main'"):
        plot_report(report, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_inspect_plot_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(hand_built_report()))
    out = tmp_path / "plots" / "out.png"
    assert main(["inspect", str(run), "--plot", str(out)]) == 0
    assert "layers" in capsys.readouterr().out  # the tables are still printed
    assert_png(out)


def test_inspect_plot_of_a_missing_run_is_an_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing"), "--plot", str(tmp_path / "out.png")]) == 2
    assert "nothing not found: expected a run folder" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_run_plot_hook_writes_report_png(tmp_path):
    pipeline._write_report_plot(hand_built_report(), tmp_path / "report.png")
    assert_png(tmp_path / "report.png")


def test_run_plot_hook_only_warns_without_matplotlib(tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    with caplog.at_level(logging.WARNING, logger="lrsparse.pipeline"):
        pipeline._write_report_plot(hand_built_report(), tmp_path / "report.png")
    assert not (tmp_path / "report.png").exists()
    assert "report plot skipped (matplotlib unavailable" in caplog.text
