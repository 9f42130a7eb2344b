"""`python -m wiremesh.agent.magicsock CONFIG.json`: see filemode.py."""

import sys

from wiremesh.agent.magicsock.filemode import main

sys.exit(main())
