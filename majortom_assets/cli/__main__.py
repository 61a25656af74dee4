"""`python -m majortom_assets.cli` runs the `majortom` command."""

import sys

from majortom_assets.cli import main

sys.exit(main())
