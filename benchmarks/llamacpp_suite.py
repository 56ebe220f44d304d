"""llama.cpp's own server tests, run against this server (or against llama-server, to tell which failures are
about the models).

    python benchmarks/llamacpp_suite.py --llama-cpp DIR                      # against python -m codellama.serve
    python benchmarks/llamacpp_suite.py --llama-cpp DIR --target llama-server --llama-server BIN
    python benchmarks/llamacpp_suite.py --llama-cpp DIR -k test_infill       # a subset (pytest's -k)

DIR is a llama.cpp source tree (e.g. ``vendor/llama.cpp`` of llama-cpp-python's source distribution). Its
``tools/server/tests`` is copied to a temporary folder (never into this repository) and only its
``ServerProcess`` is swapped, by appending ``llamacpp_suite_process.py`` to the copy's ``utils.py``; the tests
themselves run unchanged, with llama.cpp's own pytest configuration.

The tests download tiny GGUF models from Hugging Face, which cannot be reached here. Each preset maps to local
weights instead: ``tinyllama2`` (``stories260K``) to the very same trained stories260K weights from
``../shared/data`` (so greedy text matches llama-server's), ``tinyllama_infill`` (a stories260K trained for
FIM) to the bundled tiny model, which can infill; any other model fails its test with a message saying it is
not available. For llama-server the same weights are written as GGUF (``gguf_export.py``).

The result is one line per outcome, each failure listed with its reason when it is a known one
(:data:`KNOWN`, also in docs/server.md); an unexpected failure makes the exit status 1. Needs pytest,
requests, wget, filelock and openai (llama.cpp's test requirements), and ``gguf`` for ``--target llama-server``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FILES = ("test_basic", "test_completion", "test_infill", "test_chat_completion", "test_security", "test_ctx_shift")
STORIES = os.path.join(REPO, "..", "shared", "data", "stories260K", "meta")

# Failures that are not this server's protocol: the models' exact text, or features it does not claim. The
# key is a test id prefix (file::name, parameters included where only some cases fail); the value the reason.
# The same list, grouped, is in docs/server.md.
UNAVAILABLE = "its model cannot be downloaded here (no local equivalent)"
SAMPLED = ("the text sampled at temperature 0.8: this engine draws with its own random generator, not llama.cpp's "
           "(llama-server passes it on the same weights)")
TEMPLATE = ("chat templates: this server speaks Code Llama's [INST] format only (no Jinja, no chatml, one system "
            "message first); prompt counts and texts differ")
FINGERPRINT = ("system_fingerprint: llama-server's is its build number ('b1234-…', which the tests check), this "
               "server's OpenAI's form ('fp_…', a digest of the model)")
TIMINGS_PER_TOKEN = "timings_per_token: this server puts timings in the final chunk only"
KNOWN: Dict[str, str] = {
    "test_basic.py::test_server_multiple_addresses": "several --host addresses at once: one address here",
    "test_basic.py::test_server_props": "model_path names a GGUF file; this server loads checkpoint directories",
    "test_basic.py::test_load_split_model": UNAVAILABLE,
    "test_basic.py::test_no_ui": "no web UI",
    "test_completion.py::test_completion[I believe": SAMPLED,
    "test_completion.py::test_completion_stream[I believe": SAMPLED,
    "test_completion.py::test_completion_with_openai_library": FINGERPRINT + "; and " + SAMPLED,
    "test_completion.py::test_completion_stream_with_openai_library_stops": UNAVAILABLE,
    "test_completion.py::test_completion_stream_with_openai_library": SAMPLED,
    "test_completion.py::test_completion_unified": "--kv-unified (slots sharing one pool): each slot has its own context",
    "test_completion.py::test_n_probs_post_sampling": "post_sampling_probs: probabilities are the model's, before sampling",
    "test_completion.py::test_n_probs_post_backend_sampling": "post_sampling_probs and backend sampling",
    "test_completion.py::test_logit_bias": "logit_bias: the engine's sampler has no bias",
    "test_completion.py::test_completion_prompt_cache": ("SentencePiece drops a prompt's leading space, llama.cpp's "
                                                          "tokenizer keeps it: one token fewer"),
    "test_infill.py::test_infill_without_input_extra": "the text of a stories260K trained for FIM, not available: the "
                                                       "bundled model answers with code",
    "test_infill.py::test_infill_with_input_extra": "the same model text",
    "test_chat_completion.py::test_chat_completion[": FINGERPRINT + "; and " + TEMPLATE,
    "test_chat_completion.py::test_chat_completion_cached_tokens": TEMPLATE,
    "test_chat_completion.py::test_chat_completion_stream": FINGERPRINT,
    "test_chat_completion.py::test_chat_completion_with_openai_library": FINGERPRINT,
    "test_chat_completion.py::test_chat_template": "the llama3 template and the __verbose debug object",
    "test_chat_completion.py::test_chat_template_assistant_prefill": TEMPLATE + "; assistant prefill",
    "test_chat_completion.py::test_chat_template_continue_final_message": TEMPLATE + "; assistant prefill",
    "test_chat_completion.py::test_apply_chat_template": TEMPLATE + " (the test asks for command-r's)",
    "test_chat_completion.py::test_completion_with_response_format": "JSON modes and schemas",
    "test_chat_completion.py::test_completion_with_json_schema": "JSON schemas",
    "test_chat_completion.py::test_completion_with_grammar": "grammars",
    "test_chat_completion.py::test_completion_with_invalid_grammar": "grammars",
    "test_chat_completion.py::test_chat_completion_with_timings_per_token": TIMINGS_PER_TOKEN,
    "test_chat_completion.py::test_logit_bias": "logit_bias: the engine's sampler has no bias",
    "test_chat_completion.py::test_context_size_exceeded": TEMPLATE + ": the test's 200 messages repeat the system "
                                                           "message, a 400 before any length check",
    "test_chat_completion.py::test_return_progress": "return_progress (prompt progress events in chat streams)",
    "test_chat_completion.py::test_verbose_debug": "the __verbose debug object",
    "test_security.py::test_access_public_endpoint": ("/health needs the API key too, as docs/server.md promises "
                                                      "(llama-server leaves it public)"),
    "test_security.py::test_access_static_assets_without_api_key": "no web UI",
    "test_security.py::test_correct_api_key_anthropic_header": "Anthropic's X-Api-Key header",
    "test_security.py::test_cors_": ("CORS: llama-server allows localhost origins by default; this server only "
                                     "the origins listed in --cors-origins (the suite starts it without)"),
    "test_security.py::test_local_media_file": UNAVAILABLE + "; images",
}


def server_flags(python: str, repo: str) -> List[str]:
    """Every flag ``python -m codellama.serve --help`` lists, run in ``repo``."""
    out = subprocess.run([python, "-m", "codellama.serve", "--help"], capture_output=True, text=True, cwd=repo,
                         check=True).stdout
    return sorted({word.rstrip(",") for word in out.split() if word.startswith("--")})


def free_port() -> int:
    """A port nobody listens on now (the suite's default, 8080, may be taken on a shared machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_gguf_models(tmp: str) -> Dict[str, str]:
    """The local weights as GGUF files for llama-server: stories260K and the bundled tiny model."""
    sys.path.insert(0, HERE)
    import torch
    from gguf_export import write_gguf
    from codellama.checkpoint import BUNDLED_CKPT_DIR, load_model
    out = {}
    for name, ckpt in (("stories260K", STORIES), ("tiny", BUNDLED_CKPT_DIR)):
        model = load_model(ckpt, device="cpu", dtype=torch.float32, optimize=False)
        path = os.path.join(tmp, f"{name}.gguf")
        write_gguf(path, {k: v.float() for k, v in model.state_dict().items()}, model.args,
                   os.path.join(ckpt, "tokenizer.model"))
        out[name] = path
    return out


def models(tmp: str, target: str) -> Dict[str, dict]:
    """The tests' model repositories mapped to local weights (``ckpt_dir`` for this server, ``gguf`` for llama-server)."""
    gguf = write_gguf_models(tmp) if target == "llama-server" else {}
    stories = {"ckpt_dir": os.path.abspath(STORIES), "gguf": gguf.get("stories260K"),
               "chat_format": "inst"}  # stories260K has no instruct format: llama-server falls back to one, so do we
    tiny = {"ckpt_dir": None, "gguf": gguf.get("tiny")}
    return {"ggml-org/test-model-stories260K": stories, "ggml-org/test-model-stories260K-infill": tiny,
            "(router: no model)": stories}  # llama-server's router mode serves no model; its tests are about CORS


def prepare(llama_cpp: str, tmp: str) -> str:
    """The suite copied under ``tmp`` with the same relative layout (tests refer to ../../../models and
    ../../../tools), its ServerProcess swapped; returns the tests folder."""
    tests = os.path.join(tmp, "tools", "server", "tests")
    shutil.copytree(os.path.join(llama_cpp, "tools", "server", "tests"), tests)
    for part in ("models", os.path.join("tools", "mtmd")):
        if os.path.isdir(os.path.join(llama_cpp, part)):
            os.symlink(os.path.join(os.path.abspath(llama_cpp), part), os.path.join(tmp, part))
    with open(os.path.join(HERE, "llamacpp_suite_process.py")) as f:
        swap = f.read()
    with open(os.path.join(tests, "utils.py"), "a") as f:
        f.write("\n\n" + swap)
    return tests


def outcomes(junit: str) -> List[Tuple[str, str, str]]:
    """``(test id, outcome, message)`` for each test case of a JUnit XML report."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').split('.')[-1]}.py::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
                break
        rows.append((test_id, outcome, message))
    return rows


def known_reason(test_id: str) -> str:
    return next((reason for prefix, reason in KNOWN.items() if test_id.startswith(prefix)), "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"), help="llama.cpp source tree ($LLAMA_CPP_DIR)")
    p.add_argument("--target", choices=("codellama", "llama-server"), default="codellama")
    p.add_argument("--llama-server", default=None, help="the llama-server binary (default: DIR/build/bin/llama-server)")
    p.add_argument("-k", default=None, help="pytest's -k expression")
    p.add_argument("--files", nargs="*", default=list(FILES))
    p.add_argument("--repo", default=REPO, help="the checkout whose server runs (default: this one; e.g. an older "
                                                "commit's files, to measure before a change)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    p.add_argument("--log", default=None, help="write pytest's whole output here")
    a = p.parse_args()
    if not a.llama_cpp or not os.path.isdir(os.path.join(a.llama_cpp, "tools", "server", "tests")):
        sys.exit("give --llama-cpp DIR (a llama.cpp source tree holding tools/server/tests)")
    tmp = tempfile.mkdtemp(prefix="llamacpp-suite-")
    try:
        tests = prepare(a.llama_cpp, tmp)
        env = {**os.environ, "SUITE_TARGET": a.target, "SUITE_REPO": os.path.abspath(a.repo),
               "SUITE_PYTHON": sys.executable, "SUITE_MODELS": json.dumps(models(tmp, a.target)),
               "SUITE_FLAGS": json.dumps(server_flags(sys.executable, a.repo) if a.target == "codellama" else []),
               "PORT": str(free_port()),
               "SUITE_LLAMA_SERVER": a.llama_server or os.path.join(a.llama_cpp, "build", "bin", "llama-server"),
               "PYTHONPATH": ""}
        junit = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={junit}",
               *[os.path.join("unit", f + ".py") for f in a.files]] + (["-k", a.k] if a.k else [])
        with open(a.log or os.devnull, "w") as log:
            subprocess.run(cmd, cwd=tests, env=env, stdout=log, stderr=subprocess.STDOUT)
        rows = outcomes(junit)
    finally:
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(rows, a.target)


def report(rows: List[Tuple[str, str, str]], target: str) -> None:
    passed = [r for r in rows if r[1] == "passed"]
    failed = [r for r in rows if r[1] == "failed"]
    skipped = [r for r in rows if r[1] == "skipped"]
    unexpected = [r for r in failed if not known_reason(r[0])]
    print(f"{target}: {len(passed)} passed, {len(failed)} failed ({len(failed) - len(unexpected)} known, "
          f"{len(unexpected)} unexpected), {len(skipped)} skipped, of {len(rows)}")
    for test_id, _, message in failed:
        reason = known_reason(test_id)
        print(f"  {'known' if reason else 'FAIL '} {test_id}: {reason or message}")
    sys.exit(1 if unexpected and target == "codellama" else 0)


if __name__ == "__main__":
    main()
