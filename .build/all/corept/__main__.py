import sys

from corept.cli import main

sys.exit(main())
