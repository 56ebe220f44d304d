"""Code infilling: fill the <FILL> gap of each prompt from the code before and after it.

    python example_infill.py --ckpt_dir CodeLlama-7b/
    python example_infill.py --prompt $'def area(r):\n    <FILL>\n'
"""

from codellama.commands import build, example_parser, is_main_process, run

FILL = "<FILL>"
PROMPTS = [
    'def remove_non_ascii(s: str) -> str:\n    """ <FILL>\n    return result\n',
    "# Installation instructions:\n    ```bash\n<FILL>\n    ```\nThis downloads the LLaMA inference code and installs the repository as a local pip package.\n",
    "class InterfaceManagerFactory(AbstractManagerFactory):\n    def __init__(<FILL>\ndef main():\n    factory = InterfaceManagerFactory(start=datetime.now())\n    managers = []\n    for i in range(10):\n        managers.append(factory.build(id=i))\n",
    "/-- A quasi-prefunctoid is 1-connected iff all its etalisations are 1-connected. -/\ntheorem connected_iff_etalisation [C D : precategoroid] (P : quasi_prefunctoid C D) :\n  π₁ P = 0 ↔ <FILL> = 0 :=\nbegin\n  split,\n  { intros h f,\n    rw pi_1_etalisation at h,\n    simp [h],\n    refl\n  },\n  { intro h,\n    have := @quasi_adjoint C D P,\n    simp [←pi_1_etalisation, this, h],\n    refl\n  }\nend\n",
]


def split_prompt(prompt: str) -> tuple[str, str]:
    if prompt.count(FILL) != 1:
        raise ValueError(f"an infilling prompt needs exactly one {FILL} marker, found {prompt.count(FILL)}: {prompt[:40]!r}…")
    prefix, suffix = prompt.split(FILL)
    return prefix, suffix


def main() -> None:
    parser = example_parser(__doc__, temperature=0.0, top_p=0.9, max_seq_len=256, max_batch_size=4, max_gen_len=128)
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"your own code with one {FILL} marker (repeatable; default: the built-in prompts)")
    args = parser.parse_args()
    prompts = args.prompt or PROMPTS
    prefixes, suffixes = zip(*(split_prompt(p) for p in prompts))  # check the markers before loading
    generator = build(args)
    results = generator.text_infilling(list(prefixes), list(suffixes), temperature=args.temperature, top_p=args.top_p,
                                       max_gen_len=args.max_gen_len)
    if is_main_process():
        for prompt, result in zip(prompts, results):
            print("\n================= Prompt text =================\n")
            print(prompt)
            print("\n================= Filled text =================\n")
            print(result["full_text"])


if __name__ == "__main__":
    run(main)
