"""``python -m vqlab.train [--config PRESET|FILE] [key=value ...]``: the trainer's command line.

The trainer itself is ``vqlab.trainer.fit`` (also ``vqlab.fit(cfg)``).
"""

import sys

from vqlab.trainer import main

if __name__ == "__main__":
    sys.exit(main())
