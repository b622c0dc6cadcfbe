"""``python -m saga.cli``."""

from saga.cli import main

raise SystemExit(main())
