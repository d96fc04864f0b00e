"""`python -m mlip ...` is the `mlip` command; torchrun starts it so: `torchrun ... -m mlip train config.yaml`."""

import sys

from .cli import main

sys.exit(main())
