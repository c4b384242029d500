import sys

from reclaimer.app.cli import main

sys.exit(main())
