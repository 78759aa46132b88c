"""python -m mmopd: the same as the `mmopd` command."""

import sys

from mmopd.cli import main

sys.exit(main())
