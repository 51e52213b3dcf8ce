"""``python -m xmc``: the same as the ``xmc`` command."""

from xmc.cli import main

raise SystemExit(main())
