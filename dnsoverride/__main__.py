"""`python -m dnsoverride` runs the same entry point as the `dnsoverride` script."""

import sys

from dnsoverride.cli import main

sys.exit(main())
