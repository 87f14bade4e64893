"""Compares two reference folders: report metrics/stages/layers and every saved tensor, bitwise."""
import json, sys
from pathlib import Path
from safetensors.torch import load_file
import torch
a, b = Path(sys.argv[1]), Path(sys.argv[2])
ok = True
for run in sorted(p.name for p in a.iterdir()):
    ra, rb = json.loads((a/run/"report.json").read_text()), json.loads((b/run/"report.json").read_text())
    same_metrics = ra["final_metrics"] == rb["final_metrics"] and [s["metrics"] for s in ra["stages"]] == [s["metrics"] for s in rb["stages"]]
    same_loss = [s.get("mean_loss") for s in ra["stages"]] == [s.get("mean_loss") for s in rb["stages"]]
    la = [(l["name"], l.get("rank"), l.get("density"), l.get("relative_error")) for l in ra["layers"]]
    lb = [(l["name"], l.get("rank"), l.get("density"), l.get("relative_error")) for l in rb["layers"]]
    ta, tb = load_file(a/run/"model"/"model.safetensors"), load_file(b/run/"model"/"model.safetensors")
    same_tensors = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    print(f"{run:14s} metrics {same_metrics} loss {same_loss} layers {la == lb} tensors {same_tensors} ({len(ta)}) main {ra['final_metrics']['main']:.4f}")
    ok &= same_metrics and same_loss and la == lb and same_tensors
print("IDENTICAL" if ok else "DIFFERENT")
