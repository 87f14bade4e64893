"""lrsparse: Low-Rank Prune-And-Factorize compression of fine-tuned transformers."""
from lrsparse import ops  # loads the compiled extension and registers fakes and autograd
from lrsparse.ops import BUILD_INFO

__version__ = "0.1.0"
__all__ = ["ops", "BUILD_INFO", "__version__"]
