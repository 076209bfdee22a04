"""`python -m hpcdistill ...` (as under `torchrun -m hpcdistill train ...`): the `hpcdistill` command."""

import sys

from hpcdistill.cli.main import main

sys.exit(main())
