"""Code infilling: fill the <FILL> gap of each prompt (the same program as ``python -m codellama infill``).

    python example_infill.py --ckpt_dir CodeLlama-7b/
    python example_infill.py --prompt $'def area(r):\n    <FILL>\n'
"""

from codellama.cli.generate import infill, run

if __name__ == "__main__":
    run(infill)
