"""``python -m codellama.convert``: the converter's program (``codellama.cli.convert``)."""

import sys

from .cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
