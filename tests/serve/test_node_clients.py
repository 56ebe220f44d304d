"""The npm clients (``openai``, ``ollama``, Continue's ``@continuedev/openai-adapters``) against a keyed server:
each answer equals the library's own. Needs node and the packages: set ``CODELLAMA_NODE_MODULES`` to a folder
holding them, or the test installs them with npm into a temporary folder; it skips with one line when node,
npm or the registry is missing."""

import json
import os
import pathlib
import shutil
import subprocess

import pytest
from test_serve import DIALOG, NAME, PREFIX, SUFFIX, infilled, make_service, running

from codellama import Llama

PACKAGES = ["openai", "ollama", "@continuedev/openai-adapters"]
SCRIPT = pathlib.Path(__file__).with_name("node_clients.mjs")
N = 24  # test_serve's infilled() length


def node_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    """A temporary folder whose node_modules holds :data:`PACKAGES` (``$CODELLAMA_NODE_MODULES``'s, or
    installed there), with the script copied in: ES modules resolve packages from the script's own folder."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    folder = tmp_path / "npm"
    folder.mkdir()
    given = os.environ.get("CODELLAMA_NODE_MODULES")
    if given:
        (folder / "node_modules").symlink_to(pathlib.Path(given).resolve() / "node_modules")
    else:
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed")
        (folder / "package.json").write_text('{"private": true}')
        try:
            r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", *PACKAGES],
                               cwd=folder, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip("npm install timed out (no registry?)")
        if r.returncode != 0:
            pytest.skip(f"npm install failed (no registry?): {(r.stderr.strip().splitlines() or [''])[0]}")
    missing = [p for p in PACKAGES if not (folder / "node_modules" / p).is_dir()]
    if missing:
        pytest.skip(f"npm packages missing in {folder}: {missing}")
    shutil.copyfile(SCRIPT, folder / SCRIPT.name)
    return folder


@pytest.mark.slow
def test_npm_clients_get_the_librarys_answers(tmp_path):
    folder = node_folder(tmp_path)
    tiny = Llama.build(max_seq_len=256, max_batch_size=4, device="cpu")
    chat = tiny.chat_completion([DIALOG], temperature=0, max_gen_len=N)[0]["generation"]["content"]
    infill = infilled(tiny)
    with running(make_service(tiny, max_batch_size=4), api_key="npm-key") as srv:
        config = {"url": srv.url, "model": NAME, "key": "npm-key", "prefix": PREFIX, "suffix": SUFFIX,
                  "dialog": DIALOG, "n": N}
        r = subprocess.run(["node", SCRIPT.name, json.dumps(config)], cwd=folder, capture_output=True, text=True,
                           timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("openai_infill", "ollama_infill", "continue_fim", "continue_completion"):
        assert out[name] == infill, name
    for name in ("openai_chat", "ollama_chat", "continue_chat"):
        assert out[name] == chat, name
    assert out["openai_fingerprint"].startswith("fp_") and out["openai_cached"] >= 0
    assert out["openai_models"] == out["continue_models"] == [NAME] and out["ollama_models"] == [NAME + ":latest"]
    assert out["ollama_can_insert"]
