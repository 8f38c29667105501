"""vqlab: a lab for ablating vector-quantization image tokenizers.

``vqlab.fit(cfg)`` trains; ``python -m vqlab.train`` is its command line (``vqlab.train`` is that
module, so no public name is both a module and a function).
"""

from vqlab import config, quantizers
from vqlab.runfolder import RunFolder
from vqlab.trainer import fit

__all__ = ["RunFolder", "config", "fit", "quantizers"]
__version__ = "0.1.0"
