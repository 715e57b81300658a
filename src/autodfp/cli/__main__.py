import sys

from autodfp.cli.app import main

sys.exit(main())
