"""vqlab: a lab for ablating vector-quantization image tokenizers.

``vqlab.fit(cfg)`` trains; ``python -m vqlab.train`` is its command line (``vqlab.train`` is that
module, so no public name is both a module and a function). ``fit`` is imported on first use, so
that ``import vqlab.config`` (a config read and checked) imports no trainer and no evaluator.
"""

import warnings
from typing import Any

from tqdm import TqdmWarning

from vqlab import config, quantizers
from vqlab.runfolder import RunFolder

# MLflow imports tqdm.auto, which in a Jupyter kernel without ipywidgets warns on import, into every
# executed notebook; vqlab's own bars are plain text (tqdm), so the warning concerns nothing it shows.
warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)

__all__ = ["RunFolder", "config", "fit", "quantizers"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "fit":
        from vqlab.trainer import fit

        return fit
    raise AttributeError(f"module 'vqlab' has no attribute {name!r}")
