"""``python -m raydistill <verb> …`` is the ``raydistill`` command."""

import sys

from raydistill.workflows.cli import main

sys.exit(main())
