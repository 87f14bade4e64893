"""Scoring a saved model: ``lrsparse evaluate`` on its run's dev set, a GLUE / SQuAD dev split, or the user's own
labelled file, with the settings the compression run saved beside the model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lrsparse.data import PaddingCollator
from lrsparse.embedding import transformer_folder
from lrsparse.io import LAYERS_FILE, load_compressed, saved_extra
from lrsparse.modeling import check_precision, check_tokenizer_fits, folder_hint, quiet_transformers, resolve_device
from lrsparse.owndata import TEXT_TASK, DataSpec, LabelSpace, read_labelled_file, subset
from lrsparse.tasks import TextFilesTask, resolve_task
from lrsparse.training import evaluate

__all__ = ["evaluate_saved"]


def evaluate_saved(model_dir: str | os.PathLike, task: str | None = None, data_dir: str | None = None,
                   max_eval_samples: int | None = None, batch_size: int = 64, max_seq_len: int | None = None,
                   device: str = "auto", seed: int | None = None, doc_stride: int | None = None,
                   allow_random_head: bool = False, precision: str = "fp32",
                   validation_file: str | os.PathLike | None = None) -> dict:
    """Metrics of a model saved by :func:`lrsparse.io.save_compressed` (its folder or the run folder holding it, or a
    plain transformers folder) on the dev
    split of ``task`` (None: the task the model was compressed for), or for a model of your own labelled data on its
    run's dev set or on ``validation_file`` (read with the run's columns, scored in the model's labels).

    A plain folder without the task's trained head (e.g. a pre-trained encoder) is an error: its head would be
    randomly initialized and the score meaningless, unless ``allow_random_head``.

    ``max_seq_len``, ``doc_stride`` and ``seed`` left as None take the values the compression run saved with the
    model (then 128, max_seq_len // 4 and 0 for a model saved without them); ``task`` must be the run's task.
    """
    from transformers import AutoTokenizer

    from lrsparse.predict import run_model_dir

    target_device = resolve_device(device)
    check_precision(precision, target_device)
    model_dir = run_model_dir(model_dir)  # a run folder: its model/ folder
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} not found")
    compressed = (model_dir / LAYERS_FILE).is_file()
    _refuse_export(model_dir)
    saved = saved_extra(model_dir) if compressed else {}
    if task is None:
        task = saved.get("task")
        if task is None:
            raise ValueError(f"{model_dir} does not say which task it was trained for: pass --task")
    if task == TEXT_TASK and "data" not in saved:
        raise ValueError(f"task {TEXT_TASK}: {model_dir} was not saved by a run on your own data (no data spec)")
    spec = resolve_task(task, data=DataSpec.from_dict(saved["data"]) if task == TEXT_TASK else None)
    if saved.get("task") not in (None, spec.name):
        raise ValueError(f"task {spec.name!r} differs from the task {saved['task']!r} the model in {model_dir} was "
                         f"compressed for: pass --task {saved['task']}")
    if validation_file is not None and spec.name != TEXT_TASK:
        raise ValueError(f"validation_file (--validation-file) scores a model trained on your own data; task "
                         f"{spec.name!r} reads its dev split from --data-dir")
    if max_seq_len is None:
        max_seq_len = saved.get("max_seq_len", 128)
    if doc_stride is None:
        doc_stride = saved.get("doc_stride")
    if seed is None:
        seed = saved.get("seed", 0)
    if spec.name == TEXT_TASK:
        from transformers import AutoConfig

        spec = TextFilesTask(spec.data, LabelSpace.from_model_config(AutoConfig.from_pretrained(model_dir),
                                                                     spec.data.metric))
        examples = (subset(read_labelled_file(validation_file, spec.data, spec.spec), max_eval_samples, seed)
                    if validation_file is not None else spec.load("dev", None, max_eval_samples, seed))
    else:
        examples = spec.load("dev", data_dir, max_eval_samples, seed)
    quiet_transformers()
    if compressed:
        model = load_compressed(model_dir)
    else:
        hint = folder_hint(model_dir)
        if hint:
            raise ValueError(hint)
        model, loading = spec.auto_model_class().from_pretrained(model_dir, dtype=torch.float32,
                                                                 output_loading_info=True)
        if loading["missing_keys"] and not allow_random_head:
            missing = sorted(loading["missing_keys"])
            raise ValueError(
                f"model in {model_dir} has no trained {spec.name} head (its checkpoint lacks {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}): these weights would be random and the score meaningless. "
                "Fine-tune it first (lrsparse compress), or pass --allow-random-head to score it anyway")
    spec.check_model(model, str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(transformer_folder(model_dir))
    check_tokenizer_fits(tokenizer, model.config, max_seq_len, str(model_dir))
    dataset = spec.tokenize(examples, tokenizer, max_seq_len, doc_stride)
    return evaluate(model.to(target_device), dataset, spec, batch_size, PaddingCollator(tokenizer.pad_token_id or 0),
                    target_device, desc=f"eval {spec.name}", precision=precision)


def _refuse_export(model_dir: Path) -> None:
    """An `lrsparse export` folder loads only through its generated code: loading its base class would leave the
    low-rank layers' weights missing, which must not read as "no trained head"."""
    from lrsparse.export import CONFIG_LAYERS_KEY

    config_file = Path(transformer_folder(model_dir)) / "config.json"
    try:
        exported = CONFIG_LAYERS_KEY in json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a readable config: the loader's own error says so
    if exported:
        raise ValueError(f"{model_dir} is an `lrsparse export` (plain two-linear layers, loaded with "
                         "trust_remote_code=True); evaluate the compressed model it was exported from (the run "
                         "folder or its model/ folder)")
