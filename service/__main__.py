"""``python -m service BUNDLE_DIR``: the same as ``xmc serve`` without the builder's CLI."""

import sys

from service.cli import main

sys.exit(main())
