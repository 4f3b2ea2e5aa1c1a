"""``python -m promptkd``: the ``promptkd`` command (:mod:`promptkd.cli`), for environments without the console
script on PATH."""

import sys

from .cli import main

sys.exit(main())
