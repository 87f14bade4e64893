"""Command line: ``lrsparse compress | evaluate | inspect | export``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from lrsparse.checkpoint import CheckpointError
from lrsparse.config import PRESETS, LPAFConfig, registry_choices
from lrsparse.export import FORMATS, describe, export_compressed
from lrsparse.factorization import FactorizationError
from lrsparse.pipeline import evaluate_saved, run_compression
from lrsparse.recipe import RecipeConfig
from lrsparse.report import format_report, load_report, plot_report

log = logging.getLogger("lrsparse")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


_SCALARS = {"int": int, "float": float, "str": str}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, preset_defaults: dict | None = None,
                            only: tuple[str, ...] | None = None) -> None:
    """One flag per field of dataclass ``cls`` (or of the fields named in ``only``), from its annotation and
    metadata (help, choices or the registry whose names are the choices, flag name, required), as transformers'
    HfArgumentParser does; the parsed value lands under the field's name.

    With ``preset_defaults`` the flags default to None (unset): only the flags given override the preset, whose
    values the help shows."""
    for spec in dataclasses.fields(cls):
        meta = spec.metadata
        if meta.get("cli") is False or (only is not None and spec.name not in only):
            continue
        flag = "--" + (meta.get("cli") or spec.name).replace("_", "-")
        annotation = str(spec.type).replace(" ", "")
        kinds = [k for k in annotation.split("|") if k != "None"]
        kwargs: dict = {"dest": spec.name, "help": meta.get("help", "")}
        choices = meta.get("choices")
        if meta.get("registry"):
            choices = registry_choices(meta["registry"], allow_none=meta.get("allow_none", False))
        if choices is not None:
            kwargs["choices"] = list(choices)
        default = spec.default if spec.default is not dataclasses.MISSING else None
        if preset_defaults is not None and spec.name in preset_defaults:
            kwargs["help"] += f" (lpaf preset: {preset_defaults[spec.name]})"
            default = None
        if kinds == ["bool"]:
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        if kinds[0].startswith(("list[", "tuple[")):  # list[str] / tuple[str, ...]: one or more values
            kwargs["nargs"] = meta.get("nargs", "+")
            kinds = [kinds[0][kinds[0].index("[") + 1:-1].split(",")[0]]
        if meta.get("required"):
            kwargs["required"] = True
        elif default is not None and preset_defaults is None:
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag, type=_SCALARS[kinds[0]], default=default, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrsparse", description="Low-Rank Prune-And-Factorize compression")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="fine-tune, prune, factorize and save a model for a GLUE task "
                                   "or SQuAD, or distill a sentence-embedding model (--task embedding)")
    add_dataclass_arguments(compress.add_argument_group("recipe"), RecipeConfig)
    lpaf_defaults = dataclasses.asdict(PRESETS["lpaf"])
    add_dataclass_arguments(compress.add_argument_group("method (override the --method preset)"), LPAFConfig,
                            preset_defaults={k: v for k, v in lpaf_defaults.items() if k != "keep"})
    compress.add_argument("--no-inspect", action="store_true", help="do not print the report table at the end")

    evaluate = commands.add_parser("evaluate", help="evaluate a saved compressed model on a GLUE or SQuAD dev split "
                                   "(task embedding: STS-B dev, cosine similarity)")
    evaluate.add_argument("--model", required=True, help="folder written by `lrsparse compress` (its model/ folder "
                          "or the run folder)")
    evaluate.add_argument("--task", required=True)
    evaluate.add_argument("--data-dir", default=None)
    evaluate.add_argument("--max-eval-samples", type=_positive_int, default=None)
    evaluate.add_argument("--batch-size", type=_positive_int, default=64)
    # None: the value the compression run saved with the model, so that the scores match the run's.
    evaluate.add_argument("--max-seq-len", type=int, default=None,
                          help="default: the compression run's (128 for a model saved without it)")
    evaluate.add_argument("--doc-stride", type=_positive_int, default=None,
                          help="squad: see compress --doc-stride (default: the compression run's)")
    evaluate.add_argument("--seed", type=int, default=None,
                          help="seed of the --max-eval-samples subset (default: the compression run's, else 0)")
    evaluate.add_argument("--device", default="auto")
    add_dataclass_arguments(evaluate, RecipeConfig, only=("precision",))
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.add_argument("--allow-random-head", action="store_true",
                          help="score a plain checkpoint that has no trained head for the task (a random head)")

    inspect = commands.add_parser("inspect", help="print the report of a run as tables")
    inspect.add_argument("run", help="run folder (or its report.json)")
    inspect.add_argument("--json", action="store_true", help="print the validated report JSON instead")
    inspect.add_argument("--plot", metavar="PNG", default=None,
                         help="also draw per-layer density/rank and the main metric per stage into this PNG")

    export = commands.add_parser("export", help="export a saved compressed model to ONNX, TorchScript, a "
                                 "plain-PyTorch transformers folder or a sentence-transformers folder (none needs "
                                 "lrsparse to run)")
    export.add_argument("model", help="folder written by `lrsparse compress` (its model/ folder or the run folder)")
    export.add_argument("--format", required=True, choices=FORMATS,
                        help="pytorch: transformers folder (trust_remote_code), torchscript: .pt, onnx: .onnx, "
                        "sentence-transformers: a SentenceTransformer folder (task embedding models)")
    export.add_argument("--out", required=True, help="output folder (pytorch, sentence-transformers) or file "
                        "(torchscript, onnx)")
    export.add_argument("--int8", action="store_true", help="onnx: quantize the matrix-product weights to int8 "
                        "(onnxruntime dynamic quantization)")
    return parser


def config_from_args(args: argparse.Namespace):
    """The RecipeConfig of parsed ``compress`` arguments: the --method preset with the method flags given."""

    values = vars(args)
    method_fields = [f.name for f in dataclasses.fields(LPAFConfig)]
    overrides = {name: values[name] for name in method_fields if values.get(name) is not None}
    recipe = {f.name: values[f.name] for f in dataclasses.fields(RecipeConfig) if f.name in values}
    keep = overrides.pop("keep")
    return RecipeConfig.create(keep=keep, **recipe, **overrides)


def _compress(args) -> int:
    report = run_compression(config_from_args(args))
    if not args.no_inspect:
        print(format_report(report))
    return 0


def _model_dir(path: str):
    from pathlib import Path

    model_dir = Path(path)
    if (model_dir / "report.json").is_file() and (model_dir / "model").is_dir():
        return model_dir / "model"  # a run folder
    return model_dir


def _evaluate(args) -> int:
    model_dir = _model_dir(args.model)
    metrics = evaluate_saved(model_dir, args.task, args.data_dir, args.max_eval_samples, args.batch_size,
                             args.max_seq_len, args.device, args.seed, args.doc_stride, args.allow_random_head,
                             args.precision)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.task} dev ({model_dir}): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _inspect(args) -> int:
    report = load_report(args.run)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.plot is not None:
        log.info("wrote %s", plot_report(report, args.plot))
    return 0


def _export(args) -> int:
    print(describe(export_compressed(_model_dir(args.model), args.format, args.out, int8=args.int8)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)

    handlers = {"compress": _compress, "evaluate": _evaluate, "inspect": _inspect, "export": _export}
    try:
        return handlers[args.command](args)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    # ImportError: a missing optional package (tensorboard, datasets, onnx); the message says what to install.
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, FactorizationError, FloatingPointError,
            ImportError) as exc:
        if args.log_level == "DEBUG":
            raise
        print(f"lrsparse {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
