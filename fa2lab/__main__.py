import sys

from fa2lab.cli import main

sys.exit(main())
