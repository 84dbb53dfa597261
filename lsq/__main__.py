import sys

from lsq.cli import main

sys.exit(main())
