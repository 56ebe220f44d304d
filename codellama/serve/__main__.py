"""``python -m codellama.serve``: the server's program (``codellama.cli.serve``)."""

from ..cli import run
from ..cli.serve import main

if __name__ == "__main__":
    run(main)
