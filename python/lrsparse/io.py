"""Saving and loading compressed models: a transformers config, one safetensors file and a layer manifest.

The safetensors file holds the low-rank factors of compressed layers (never a dense copy) and every other weight of
the model as is; ``lrsparse_layers.json`` says which modules are LowRankLinear and of what rank, so that the model
can be rebuilt from its config before the weights are loaded strictly.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsparse.distributed import is_main_process
from lrsparse.layers import LowRankLinear, MixedRankLinear, _replace_module
from lrsparse.targets import is_target_layer, linear_shape

FORMAT_VERSION = 1
LAYERS_FILE = "lrsparse_layers.json"
WEIGHTS_FILE = "model.safetensors"
_LAYER_FIELDS = {"name": str, "in_features": int, "out_features": int, "rank": int, "bias": bool}


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


def compressed_layers(model: nn.Module) -> list[dict[str, Any]]:
    """Manifest entries of the LowRankLinear modules of ``model``."""
    return [
        {
            "name": name, "in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
            "bias": m.bias is not None, "method": m.method,
        }
        for name, m in model.named_modules()
        if isinstance(m, LowRankLinear)
    ]


def save_compressed(
    model: nn.Module, directory: str | os.PathLike, tokenizer=None, extra: dict | None = None
) -> int:
    """Writes config, tokenizer (optional), ``model.safetensors`` and ``lrsparse_layers.json`` into ``directory``.

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
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError(f"model must be a transformers PreTrainedModel with a config, got {type(model).__name__}")
    if extra is not None:
        try:
            json.dumps(extra)  # fail before writing anything
        except TypeError as exc:
            raise TypeError(f"extra must be JSON-serializable: {exc}") from exc

    if not is_main_process():
        return 0
    state = model.state_dict()
    aliases = _shared_storage_aliases(state)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items() if name not in aliases}
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "layers": compressed_layers(model),
        "tied_weights": aliases,
        "extra": extra or {},
    }

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lrsparse-save-", dir=directory))
    try:
        config = config.__class__.from_dict(config.to_dict())
        config.architectures = [type(model).__name__]
        config.save_pretrained(staging)
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


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: directory is not a model saved by lrsparse.save_compressed")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is corrupted (invalid JSON: {exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise ValueError(f"{path} is corrupted: expected an object with a 'layers' list")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {manifest.get('format_version')!r}; this lrsparse reads {FORMAT_VERSION}"
        )
    for i, layer in enumerate(manifest["layers"]):
        for field, kind in _LAYER_FIELDS.items():
            value = layer.get(field) if isinstance(layer, dict) else None
            if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
                raise ValueError(f"{path} is corrupted: layers[{i}].{field} must be a {kind.__name__}, got {value!r}")
    if not isinstance(manifest.get("tied_weights", {}), dict):
        raise ValueError(f"{path} is corrupted: tied_weights must be an object")
    return manifest


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

    for name in config.architectures or []:
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

    for layer in manifest["layers"]:
        name = layer["name"]
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{LAYERS_FILE} names layer {name!r}, which the model has not") from exc
        # The freshly built model has the original layer there: an nn.Linear, or a Conv1D for GPT-2.
        if not is_target_layer(old) or linear_shape(old) != (layer["in_features"], layer["out_features"]):
            raise ValueError(
                f"{LAYERS_FILE} layer {name!r} ({layer['in_features']} -> {layer['out_features']}) does not match "
                f"the model's {old}"
            )
        new = LowRankLinear(layer["in_features"], layer["out_features"], layer["rank"], bias=layer["bias"],
                            dtype=old.weight.dtype, device="meta", method=layer.get("method"))
        _replace_module(model, name, new)

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
