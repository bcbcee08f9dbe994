"""``python -m training.experiment``: the CPU experiment (see :mod:`training.experiment.run`)."""

import sys

from .run import main

sys.exit(main())
