import sys

from instgenie_cli import main

sys.exit(main())
