import sys

from dfineseg.cli import main

sys.exit(main())
