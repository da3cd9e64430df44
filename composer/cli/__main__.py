"""``python -m composer.cli ARGS``: the `compose` command."""

import sys

from composer.cli import main

sys.exit(main())
