"""`python -m visual_buffet_siglip` runs the debug CLI."""

from .cli import main

raise SystemExit(main())
