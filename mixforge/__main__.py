import sys

from mixforge.cli import main

sys.exit(main())
