"""Command line: ``lrsparse compress | evaluate | predict | inspect | export``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from lrsparse.checkpoint import CheckpointError
from lrsparse.config import PRESETS, LPAFConfig, registry_choices
from lrsparse.export import FORMATS, describe, export_compressed
from lrsparse.factorization import FactorizationError
from lrsparse.evaluation import evaluate_saved
from lrsparse.pipeline import run_compression
from lrsparse.predict import run_model_dir
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
                            only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass ``cls`` (or of the fields named in ``only``), from its annotation and
    metadata (help, choices or the registry whose names are the choices, flag name, required), as transformers'
    HfArgumentParser does; the parsed value lands under the field's name.

    With ``preset_defaults`` the flags default to None (unset): only the flags given override the preset, whose
    values the help shows."""
    for spec in dataclasses.fields(cls):
        meta = spec.metadata
        if meta.get("cli") is False or (only is not None and spec.name not in only) or spec.name in skip:
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

    compress = commands.add_parser("compress", help="fine-tune, prune, factorize and save a model for your own "
                                   "labelled text (--train-file / --dataset), a GLUE task or SQuAD, or distill a "
                                   "sentence-embedding model (--task embedding)")
    add_dataclass_arguments(compress.add_argument_group("recipe"), RecipeConfig, skip=RecipeConfig.OWN_DATA)
    add_dataclass_arguments(compress.add_argument_group("your own data (classification or regression)"),
                            RecipeConfig, only=RecipeConfig.OWN_DATA)
    lpaf_defaults = dataclasses.asdict(PRESETS["lpaf"])
    add_dataclass_arguments(compress.add_argument_group("method (override the --method preset)"), LPAFConfig,
                            preset_defaults={k: v for k, v in lpaf_defaults.items() if k != "keep"})
    compress.add_argument("--no-inspect", action="store_true", help="do not print the report table at the end")

    evaluate = commands.add_parser("evaluate", help="evaluate a saved compressed model on its run's dev set, your "
                                   "own labelled file (--validation-file), or a GLUE or SQuAD dev split (task "
                                   "embedding: STS-B dev, cosine similarity)")
    evaluate.add_argument("--model", required=True, help="folder written by `lrsparse compress` (its model/ folder "
                          "or the run folder)")
    evaluate.add_argument("--task", default=None, help="default: the task the model was compressed for")
    evaluate.add_argument("--validation-file", default=None,
                          help="your own labelled file (CSV, TSV, JSON lines, Parquet), with the run's columns")
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

    predict = commands.add_parser("predict", help="apply a classifier or regressor to new text: one prediction "
                                  "(label name and probabilities, or the value) per input row")
    predict.add_argument("model", help="run folder, its model/ folder, a `lrsparse export --format pytorch` folder or "
                         "any transformers sequence-classification folder")
    predict.add_argument("--input", required=True, help="CSV, TSV, JSON lines or Parquet file, or - for standard "
                         "input (JSON lines or CSV)")
    predict.add_argument("--output", required=True, help="output .jsonl or .csv (by extension), or - for standard "
                         "output (JSON lines)")
    predict.add_argument("--text-columns", nargs="+", default=None,
                         help="one text column or two for a pair (default: the run's, else sentence1 sentence2, "
                         "sentence or text)")
    predict.add_argument("--batch-size", type=_positive_int, default=64)
    predict.add_argument("--max-seq-len", type=_positive_int, default=None, help="default: the compression run's")
    predict.add_argument("--device", default="auto")
    add_dataclass_arguments(predict, RecipeConfig, only=("precision",))
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")

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


def _resume_own_data(args) -> None:
    """``--resume`` without the data flags continues with the data the checkpoint was made with."""
    from lrsparse.checkpoint import CheckpointStore

    given = args.task is not None or any(getattr(args, name) not in (None, RecipeConfig.__dataclass_fields__[name]
                                                                     .default) for name in RecipeConfig.OWN_DATA)
    store = CheckpointStore(Path(args.output_dir))
    if not args.resume or given or not store.exists():
        return
    saved = store.read_manifest()["config"]
    if "data" in saved:
        for name in RecipeConfig.OWN_DATA:
            setattr(args, name, saved["data"][name])
    else:
        args.task = saved.get("task")


def _compress(args) -> int:
    import torch.distributed

    from lrsparse.distributed import is_main_process

    _resume_own_data(args)
    try:
        report = run_compression(config_from_args(args))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # a torchrun launch
            torch.distributed.destroy_process_group()
    if not args.no_inspect and is_main_process():
        print(format_report(report))
    return 0


def _evaluate(args) -> int:
    model_dir = run_model_dir(args.model)
    metrics = evaluate_saved(model_dir, args.task, args.data_dir, args.max_eval_samples, args.batch_size,
                             args.max_seq_len, args.device, args.seed, args.doc_stride, args.allow_random_head,
                             args.precision, validation_file=args.validation_file)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        where = args.validation_file or f"{args.task or 'the run'}'s dev set"
        print(f"{where} ({model_dir}): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _predict(args) -> int:
    from lrsparse.predict import predict_file  # noqa: PLC0415 (tqdm and the readers only for this command)

    rows = predict_file(args.model, args.input, args.output, args.text_columns, args.batch_size, args.max_seq_len,
                        args.device, args.precision, progress=not args.no_progress)
    print(f"wrote {rows} prediction(s) to {'standard output' if args.output == '-' else args.output}",
          file=sys.stderr)
    return 0


def _inspect(args) -> int:
    report = load_report(args.run)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.plot is not None:
        log.info("wrote %s", plot_report(report, args.plot))
    return 0


def _export(args) -> int:
    print(describe(export_compressed(run_model_dir(args.model), args.format, args.out, int8=args.int8)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lrsparse.distributed import is_main_process, rank

    # Under torchrun the log is rank 0's; the other ranks report warnings and errors only, under their rank.
    logging.basicConfig(level=args.log_level if is_main_process() else max(logging.WARNING, getattr(logging,
                        args.log_level)), format=("" if is_main_process() else f"[rank {rank()}] ")
                        + "%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    handlers = {"compress": _compress, "evaluate": _evaluate, "predict": _predict, "inspect": _inspect,
                "export": _export}
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
