import sys

from upop.cli import main

sys.exit(main())
