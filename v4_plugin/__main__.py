"""`python -m v4_plugin` runs the `v4-plugin` command line."""

import sys

from v4_plugin.cli import main

sys.exit(main())
