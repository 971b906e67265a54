"""``python -m cachesvc``: the ``cachesvc`` command."""

import sys

from cachesvc.cli.main import main

sys.exit(main())
