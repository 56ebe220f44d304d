"""``python -m codellama.quantize``: the quantizer's program (``codellama.cli.quantize``)."""

import sys

from ..cli.quantize import main

if __name__ == "__main__":
    sys.exit(main())
