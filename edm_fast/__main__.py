"""``python -m edm_fast`` (also under ``torchrun -m edm_fast``) is the ``edm-fast`` command."""

import sys

from .cli.main import main

sys.exit(main())
