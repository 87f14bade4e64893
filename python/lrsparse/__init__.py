"""lrsparse: Low-Rank Prune-And-Factorize compression of fine-tuned transformers.

The public API (see the README's "Python API" and "Architecture" sections)::

    compressor = lrsparse.prepare(model, lrsparse.PRESETS["lpaf"].replace(keep=0.25), total_steps=...)
    ...  # phase 1: optimizer.step(); compressor.step(); optimizer.zero_grad()
    compressor.factorize(total_steps=..., calibration=train_loader)  # its first examples calibrate the fit
    ...  # phase 2 (a new optimizer): optimizer.step(); compressor.step(optimizer); optimizer.zero_grad()
    compressor.convert()
    lrsparse.save_compressed(model, "out/", config=compressor.config, records=compressor.records)
"""
from lrsparse import ops  # loads the compiled extension and registers fakes and autograd
from lrsparse.compressor import Compressor, prepare
from lrsparse.config import PRESETS, LPAFConfig
from lrsparse.distillation import Distiller
from lrsparse.embedding import SentenceEmbeddingModel
from lrsparse.io import load_compressed, read_manifest, save_compressed
from lrsparse.layers import LowRankLinear, MixedRankLinear, replace_module
from lrsparse.ops import BUILD_INFO
from lrsparse.records import LayerRecord
from lrsparse.registry import register_factorizer, register_pruner, register_rank_allocator

__version__ = "0.3.0"
__all__ = [
    "ops", "BUILD_INFO", "__version__",
    "LPAFConfig", "PRESETS", "prepare", "Compressor",
    "register_factorizer", "register_rank_allocator", "register_pruner",
    "save_compressed", "load_compressed", "read_manifest", "LayerRecord", "replace_module",
    "LowRankLinear", "MixedRankLinear", "Distiller", "SentenceEmbeddingModel",
]
