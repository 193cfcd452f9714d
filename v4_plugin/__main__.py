"""`python -m v4_plugin` runs the `v4-plugin` command line."""

import sys

from .cli import main

sys.exit(main())
