"""Saving and loading compressed models: a transformers config, one safetensors file and a manifest.

The safetensors file holds the low-rank factors of compressed layers (never a dense copy) and every other weight of
the model as is. ``lrsparse_layers.json`` (like peft's ``adapter_config.json``) holds the method's
:class:`~lrsparse.config.LPAFConfig` and one :class:`~lrsparse.records.LayerRecord` per compressed layer, so that
the model can be rebuilt from its config before the weights are loaded strictly. Manifests of format 1 (lrsparse
0.1: layers without kind, factorizer named "method", no config) are read and migrated.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lrsparse.config import LPAFConfig
from lrsparse.distributed import is_main_process
from lrsparse.layers import MixedRankLinear
from lrsparse.records import LayerRecord, rebuild_layers, records_of
from lrsparse.targets import is_target_layer, linear_shape

log = logging.getLogger("lrsparse.io")

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
LAYERS_FILE = "lrsparse_layers.json"
WEIGHTS_FILE = "model.safetensors"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the renames are still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shared_storage_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """alias -> first name for tensors that are the same storage view (tied weights); safetensors stores one."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen.setdefault(key, name)
    return aliases


def _checked_records(model: nn.Module, records) -> list[LayerRecord]:
    """``records`` (default: those of the model's low-rank modules) checked against the model: each low-rank one
    must match its module field by field, each sparse one name an original linear layer, none twice, and every
    low-rank module of the model must have one (a manifest that would not load back is refused here)."""
    present = {r.name: r for r in records_of(model)}
    if records is None:
        return list(present.values())
    records = list(records)
    checked, seen = [], set()
    for record in records:
        if not isinstance(record, LayerRecord):
            raise TypeError(f"records must be LayerRecord objects, got {type(record).__name__}")
        if record.name in seen:
            raise ValueError(f"records name layer {record.name!r} twice")
        seen.add(record.name)
        if record.kind == "sparse":
            try:
                module = model.get_submodule(record.name)
            except AttributeError as exc:
                raise ValueError(f"record of layer {record.name!r}: the model has no such module") from exc
            if not is_target_layer(module) or linear_shape(module) != (record.in_features, record.out_features):
                raise ValueError(f"sparse record of layer {record.name!r} does not match the model's {module}")
            checked.append(record)
            continue
        record = dataclasses.replace(record, kind="low-rank", masked=False) if record.kind == "mixed" else record
        found = present.get(record.name)
        shape = ("in_features", "out_features", "rank", "bias", "kind")
        if found is None or any(getattr(found, key) != getattr(record, key) for key in shape):
            raise ValueError(f"record of layer {record.name!r} ({', '.join(f'{k}={getattr(record, k)}' for k in shape)})"
                             f" does not match the model's {'missing layer' if found is None else found}")
        checked.append(record)
    missing = sorted(set(present) - seen)
    if missing:
        raise ValueError(f"records do not describe the model's low-rank layers {missing}")
    return checked


def save_compressed(
    model: nn.Module, directory: str | os.PathLike, tokenizer=None, extra: dict | None = None, config=None,
    records=None,
) -> int:
    """Writes config, tokenizer (optional), ``model.safetensors`` and ``lrsparse_layers.json`` into ``directory``.

    ``config`` (the :class:`~lrsparse.config.LPAFConfig` used) and ``records`` (the Compressor's records; default:
    records of the model's low-rank layers) form the manifest with ``extra`` (any JSON-serializable dict).

    Every file is written to a staging folder, fsynced, then renamed into place (the manifest last, so a directory
    with a manifest is complete). Returns the total bytes written. In a multi-process (DDP) run only rank 0 writes;
    the other ranks check the model and return 0.
    """
    from safetensors.torch import save_file

    if any(isinstance(m, MixedRankLinear) for m in model.modules()):
        raise ValueError(
            "model still has MixedRankLinear layers (a sparse path): finish mixed-rank fine-tuning or call "
            "lrsparse.layers.finalize_low_rank(model) before saving"
        )
    model_config = getattr(model, "config", None)
    if model_config is None or not hasattr(model_config, "save_pretrained"):
        raise TypeError(f"model must be a transformers PreTrainedModel with a config, got {type(model).__name__}")
    if extra is not None:
        try:
            json.dumps(extra)  # fail before writing anything
        except TypeError as exc:
            raise TypeError(f"extra must be JSON-serializable: {exc}") from exc

    records = _checked_records(model, records)
    if config is not None and not isinstance(config, LPAFConfig):
        raise TypeError(f"config must be an LPAFConfig, got {type(config).__name__}")
    if not is_main_process():
        return 0
    state = model.state_dict()
    aliases = _shared_storage_aliases(state)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items() if name not in aliases}
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "lpaf_config": None if config is None else config.to_dict(),
        "layers": [record.to_dict() for record in records],
        "tied_weights": aliases,
        "extra": extra or {},
    }

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lrsparse-save-", dir=directory))
    try:
        model_config = model_config.__class__.from_dict(model_config.to_dict())
        model_config.architectures = [type(model).__name__]
        model_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt", "lrsparse_format": str(FORMAT_VERSION)})
        (staging / LAYERS_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == LAYERS_FILE)  # manifest last
        total = 0
        for path in files:
            _fsync_file(path)
            target = directory / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            total += path.stat().st_size
            os.replace(path, target)
        _fsync_dir(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return total


def _migrate_layer(layer):
    """A format-1 layer entry as a format-2 record dict (kind low-rank; "method" is now "factorizer")."""
    if not isinstance(layer, dict):
        return layer
    migrated = {k: v for k, v in layer.items() if k != "method"}
    migrated.setdefault("kind", "low-rank")
    migrated.setdefault("factorizer", layer.get("method"))
    return migrated


def _read_manifest(path: Path) -> dict:
    """The manifest with ``records`` (LayerRecord objects) and ``config`` (LPAFConfig or None), checked field by
    field: a ValueError names the file and the first bad field."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: directory is not a model saved by lrsparse.save_compressed")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is corrupted (invalid JSON: {exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise ValueError(f"{path} is corrupted: expected an object with a 'layers' list")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(f"{path} has format_version {version!r}; this lrsparse reads {list(READABLE_VERSIONS)} "
                         "(re-save the model with the lrsparse that wrote it, or a newer one)")
    layers = manifest["layers"] if version == 2 else [_migrate_layer(layer) for layer in manifest["layers"]]
    manifest["records"] = [LayerRecord.from_dict(layer, f"{path} is corrupted: layers[{i}]")
                           for i, layer in enumerate(layers)]
    names = [r.name for r in manifest["records"]]
    if len(set(names)) != len(names):
        raise ValueError(f"{path} is corrupted: layers name a module twice")
    # The method's config describes how the weights were made; it never blocks loading them. A config that this
    # process cannot rebuild (a component registered only where the model was compressed, a newer field) is
    # kept as the raw dict under "config_dict", with "config" None and a warning.
    raw_config = manifest.get("lpaf_config")
    if raw_config is not None and not isinstance(raw_config, dict):
        raise ValueError(f"{path} is corrupted: lpaf_config must be an object or null")
    manifest["config_dict"], manifest["config"] = raw_config, None
    if raw_config is not None:
        try:
            manifest["config"] = LPAFConfig.from_dict(raw_config)
        except (ValueError, TypeError) as exc:
            log.warning("%s: lpaf_config not rebuilt as an LPAFConfig here (%s); kept as a dict", path, exc)
    tied = manifest.get("tied_weights", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise ValueError(f"{path} is corrupted: tied_weights must be an object of name -> name")
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest a :func:`save_compressed` folder holds: ``config`` (its LPAFConfig; None for models saved
    without one, or whose config this process cannot rebuild: then ``config_dict`` has it), ``records`` (its
    LayerRecords), ``extra``."""
    return _read_manifest(Path(directory) / LAYERS_FILE)


def saved_extra(directory: str | os.PathLike) -> dict:
    """The ``extra`` dict :func:`save_compressed` wrote into ``directory`` ({} when none was given)."""
    extra = _read_manifest(Path(directory) / LAYERS_FILE).get("extra", {})
    if not isinstance(extra, dict):
        raise ValueError(f"{Path(directory) / LAYERS_FILE} is corrupted: extra must be an object")
    return extra


def _model_class(config, model_class):
    if model_class is not None:
        return model_class
    import transformers

    from lrsparse.embedding import SentenceEmbeddingModel

    for name in config.architectures or []:
        if name == SentenceEmbeddingModel.__name__:
            return SentenceEmbeddingModel
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(
        f"cannot tell the model class from config.architectures {config.architectures!r}: pass model_class"
    )


def load_compressed(directory: str | os.PathLike, model_class=None) -> nn.Module:
    """Rebuilds the model saved by :func:`save_compressed` (in eval mode); every weight must come from the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    directory = Path(directory)
    manifest = _read_manifest(directory / LAYERS_FILE)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found")
    config = AutoConfig.from_pretrained(directory)
    model = _model_class(config, model_class)(config)

    rebuild_layers(model, manifest["records"], device="meta", where=str(directory / LAYERS_FILE))

    try:
        tensors = load_file(weights_path)
    except SafetensorError as exc:
        raise ValueError(f"{weights_path} is corrupted: {exc}") from exc
    for alias, source in manifest.get("tied_weights", {}).items():
        if source in tensors:
            tensors.setdefault(alias, tensors[source])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match the model: missing tensors {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected tensors {unexpected[:10]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{weights_path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
    # assign=True: the LowRankLinear factors were created on the meta device (no random init to overwrite).
    model.load_state_dict(tensors, strict=True, assign=True)
    if manifest.get("tied_weights"):
        model.tie_weights()  # assign=True gave the aliases separate Parameter objects
    return model.eval()
