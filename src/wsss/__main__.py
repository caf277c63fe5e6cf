"""``python -m wsss`` (and ``torchrun -m wsss train ...``)."""

import sys

from wsss.cli import main

sys.exit(main())
