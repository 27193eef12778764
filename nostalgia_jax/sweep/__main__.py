"""`python -m nostalgia_jax.sweep ...` (see the package docstring)."""

import sys

from nostalgia_jax.sweep import main

sys.exit(main())
