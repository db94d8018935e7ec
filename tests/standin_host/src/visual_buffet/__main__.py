"""`python -m visual_buffet`: the stand-in host's command line."""

import sys

from .cli import main

sys.exit(main())
