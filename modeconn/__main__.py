"""`python -m modeconn ...` is the `modeconn` command."""

from modeconn.training.cli import main

raise SystemExit(main())
