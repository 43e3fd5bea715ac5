"""`python -m mima ...` runs the command line."""

from mima.cli import main

raise SystemExit(main())
