"""``python -m catalog ...``: the catalog CLI for serving nodes without torch."""

import sys

from catalog.cli import main

sys.exit(main())
