"""``python -m flute_jax.bench``."""

import sys

from .cli import main

sys.exit(main())
