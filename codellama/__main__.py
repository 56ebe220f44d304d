"""``python -m codellama COMMAND [ARGS]``: every command-line program of the library (see ``codellama.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
