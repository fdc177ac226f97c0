"""`python -m localrun.cli`: the same as the `localrun` command."""

import sys

from localrun.cli import main

sys.exit(main())
