"""Forged verdicts: wrong answers that try to be scored "passed" without escaping; none may pass.

Each runs under bubblewrap where it can run (the verdict protocol is the same with ``isolation="process"``).
Where the audit hook is what stops a forgery, a control runs it without the hook and checks that it
does forge a pass there, so that the test can fail.
"""

import pytest

from codellama.evaluate import sandbox
from codellama.evaluate.sandbox import Limits, Program, SandboxUnavailable, check_isolation, run_program

try:
    check_isolation(Limits())
    LIMITS, BWRAP_REFUSAL = Limits(timeout_s=3.0), ""
except SandboxUnavailable as e:
    LIMITS, BWRAP_REFUSAL = Limits(timeout_s=3.0, isolation="process"), str(e)
# Hunting through /tmp is the host's /tmp without bubblewrap: slow, and a planted nonce would stay there.
needs_bwrap = pytest.mark.skipif(bool(BWRAP_REFUSAL), reason=f"bubblewrap cannot run here: {BWRAP_REFUSAL}")

WRONG = "def add(a, b):\n    return a - b\n\n"
TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n\ncheck(add)\n"
ABS_TESTS = "def check(candidate):\n    assert abs(candidate(2, 3) - 5) < 1e-9\n\ncheck(add)\n"
FRESH_POSIX = ("import _imp, importlib.machinery\n"
               "posix = _imp.create_builtin(importlib.machinery.ModuleSpec('posix', None))\n")
# A stand-in for the runner's test function: it reports a pass without running any test.
FAKE_TEST = "def fake(payload, ns, clean_builtins, box):\n    box.append(('passed', b''))\n"


def _wrong(attack: str, tests: str = TESTS) -> Program:
    return Program(WRONG + attack, tests, entry_points=("add",))


FORGERIES = {
    # Five ways a program could forge its verdict.
    "main-module-exit": _wrong("import sys\nsys.modules['__main__']._exit(0)\n"),
    "guard-constants": _wrong("import sys\nm = sys.modules['__main__']\n"
                              "m.EXIT_PASSED = m.EXIT_FAILED = m.EXIT_ERROR = 0\n"),
    "fresh-posix-exit": _wrong(FRESH_POSIX + "posix._exit(0)\n"),
    "settrace-swaps-check": _wrong(  # traces the module's own frame: just before `check(add)`, a no-op check
        "import sys\ndef tracer(frame, event, arg):\n"
        "    if event == 'line' and getattr(frame.f_globals.get('check'), '__name__', '') == 'check':\n"
        "        frame.f_globals['check'] = lambda candidate: None\n    return tracer\n"
        "sys._getframe().f_trace = tracer\nsys.settrace(tracer)\n"),
    "always-equal": Program("class Anything:\n    def __eq__(self, other):\n        return True\n\n"
                            "def add(a, b):\n    return Anything()\n", TESTS, entry_points=("add",)),
    # Claims of a pass the harness must not believe.
    "fake-verdict-lines": _wrong("import os, sys\nprint('passed')\nfor fd in range(1, 1024):\n    try:\n"
                                 "        os.write(fd, os.urandom(16).hex().encode() + b' passed \\n')\n"
                                 "    except OSError:\n        pass\nos._exit(0)\n"),
    "nonce-hunt": _wrong(  # every 32-hex word the program can find anywhere, claimed as the nonce
        "import os, re, sys\nseen = ' '.join(sys.argv) + ' ' + ' '.join(f'{k}={v}' for k, v in os.environ.items())\n"
        "for fd in range(1024):\n    try:\n        os.set_blocking(fd, False)\n        seen += ' ' + os.read(fd, 65536).decode('latin-1')\n"
        "    except OSError:\n        pass\nfor root, dirs, files in os.walk('/tmp'):\n    for name in files:\n"
        "        seen += ' ' + open(os.path.join(root, name), encoding='latin-1').read()\n"
        "for token in set(re.findall(r'\\b[0-9a-f]{32}\\b', seen)):\n    for fd in range(1, 1024):\n        try:\n"
        "            os.write(fd, token.encode() + b' passed \\n')\n        except OSError:\n            pass\n"
        "os._exit(0)\n"),
    "check-redefined-first": _wrong("def check(candidate):\n    pass\n"),
    # Names the tests use, changed by the completion.
    "shadowed-builtin": _wrong("abs = lambda x: 0\n", ABS_TESTS),
    "patched-builtin": _wrong("import builtins\nbuiltins.abs = lambda x: 0\n", ABS_TESTS),
    "replaced-builtins-dict": _wrong("import builtins\n__builtins__ = dict(vars(builtins), abs=lambda x: 0)\n",
                                     ABS_TESTS),
    # Leaving the tests early, from inside the function under test.
    "system-exit-in-candidate": Program("def add(a, b):\n    raise SystemExit(0)\n", TESTS, entry_points=("add",)),
    "thread-exit-in-candidate": Program("import _thread\ndef add(a, b):\n    _thread.exit()\n", TESTS,
                                        entry_points=("add",)),
    "process-exit-in-candidate": Program("import os\ndef add(a, b):\n    os._exit(0)\n", TESTS, entry_points=("add",)),
    "interrupt-main-thread": _wrong("import _thread\n_thread.interrupt_main()\nimport time\ntime.sleep(0.2)\n"),
    # Reaching the runner's own objects, and threads or handlers that would outlive the program.
    "frame-of-the-candidate": Program("import sys\ndef add(a, b):\n"
                                      "    sys._getframe(1).f_globals['candidate'] = None\n    return a - b\n",
                                      TESTS, entry_points=("add",)),
    "thread-left-running": _wrong("import threading, time\n"
                                  "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"),
    "signal-handler": _wrong("import signal\nsignal.signal(signal.SIGALRM, lambda *a: None)\n"),
}

# Forgeries that the audit hook stops: without it, each does pass (the controls below).
HOOK_STOPS = {
    "gc-replaces-the-test-code": _wrong(
        FAKE_TEST + "import gc\nfor o in gc.get_objects():\n"
        "    if type(o) is type(fake) and o.__name__ == 'test' and o.__code__.co_filename == 'runner.py':\n"
        "        o.__code__ = fake.__code__\n"),
    "frame-replaces-the-test": _wrong(FAKE_TEST + "import sys\nsys._getframe(1).f_globals['test'] = fake\n"),
    "traceback-frame-replaces-the-test": _wrong(
        FAKE_TEST + "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
        "    e.__traceback__.tb_frame.f_back.f_globals['test'] = fake\n"),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_bwrap) if n == "nonce-hunt" else n
                                  for n in sorted(FORGERIES) + sorted(HOOK_STOPS)])
def test_forgery_does_not_pass(name):
    outcome = run_program({**FORGERIES, **HOOK_STOPS}[name], LIMITS)
    assert outcome.reason in ("failed", "error"), outcome


@pytest.mark.parametrize("name", sorted(HOOK_STOPS))
def test_without_the_audit_hook_these_forgeries_pass(name):
    assert run_program(HOOK_STOPS[name], LIMITS, guard=False).passed


def test_how_each_forgery_is_reported():
    reasons = {name: run_program(FORGERIES[name], LIMITS) for name in
               ("always-equal", "fresh-posix-exit", "settrace-swaps-check", "thread-left-running", "signal-handler",
                "shadowed-builtin")}
    assert reasons["always-equal"].reason == "failed" and "compares equal to anything" in reasons["always-equal"].detail
    assert "exit status 0" in reasons["fresh-posix-exit"].detail
    assert "sys._getframe is disabled" in reasons["settrace-swaps-check"].detail
    assert "left threads running" in reasons["thread-left-running"].detail
    assert "main thread" in reasons["signal-handler"].detail
    assert reasons["shadowed-builtin"].reason == "failed"


def test_tests_use_the_reference_helpers_not_the_completions():
    # HumanEval/38 and /50 style: the tests call a helper of the prompt, which the completion redefines.
    prompt = "def encode(s):\n    return s[::-1]\n\ndef decode(s):\n    \"\"\"Undo encode.\"\"\"\n"
    completion = "    return s\n\ndef encode(s):\n    return s\n"
    tests = "def check(candidate):\n    assert candidate(encode('abc')) == 'abc'\n\ncheck(decode)\n"
    forged = Program(prompt + completion, tests, entry_points=("decode",))
    assert run_program(forged, LIMITS).passed  # the control: taking every name from the completion forges a pass
    assert run_program(Program(prompt + completion, tests, prompt, ("decode",)), LIMITS).reason == "failed"
    right = "    return s[::-1]\n"
    assert run_program(Program(prompt + right, tests, prompt, ("decode",)), LIMITS).passed


def test_the_function_under_test_may_shadow_a_builtin():
    # MBPP/126 names its function `sum`: the tests must get the program's.
    program = Program("def sum(a, b):\n    return a * b\n", "assert sum(2, 3) == 6\n", entry_points=("sum",))
    assert run_program(program, LIMITS).passed


@needs_bwrap
def test_the_nonce_hunt_would_find_a_leaked_nonce(monkeypatch):
    # The control for "nonce-hunt": where the nonce is visible (here: planted in /tmp), it forges a pass.
    monkeypatch.setattr(sandbox.secrets, "token_hex", lambda n: "5e" * n)
    hunt = FORGERIES["nonce-hunt"]
    leaky = Program(f"open('/tmp/leak', 'w').write('{'5e' * 16}')\n" + hunt.code, hunt.tests, entry_points=("add",))
    assert run_program(leaky, LIMITS).passed
