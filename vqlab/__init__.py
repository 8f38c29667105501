"""vqlab: a lab for ablating vector-quantization image tokenizers."""

from vqlab import config, quantizers
from vqlab.trainer import train

__all__ = ["config", "quantizers", "train"]
__version__ = "0.1.0"
