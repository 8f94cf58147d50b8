"""``python -m dlm_factory.catalog ...``: the catalog CLI for serving nodes without torch."""

import sys

from dlm_factory.catalog.cli import main

sys.exit(main())
