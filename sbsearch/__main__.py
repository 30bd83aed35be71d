"""``python -m sbsearch`` runs the same command line as the ``sbsearch`` script."""

import sys

from sbsearch.cli import main

if __name__ == "__main__":
    sys.exit(main())
