# The ServerProcess that llamacpp_suite.py appends to a temporary copy of llama.cpp's tools/server/tests/utils.py.
# It subclasses llama.cpp's own class (its request helpers stay llama.cpp's) and replaces only how the server is
# started: `python -m codellama.serve` with the flags equivalent to llama-server's, or llama-server itself on
# GGUF files of the same weights. The tests' Hugging Face repositories cannot be downloaded here; each known one
# maps to a local model (SUITE_MODELS, a JSON object written by the runner), and a test naming any other one
# fails with a message that says so.

import inspect as _inspect
import json as _json

_LlamaServerProcess = ServerProcess  # noqa: F821 (defined above, in llama.cpp's utils.py)


class ServerProcess(_LlamaServerProcess):  # noqa: F811
    def start(self, timeout_seconds: int = DEFAULT_HTTP_TIMEOUT) -> None:  # noqa: F821
        if any(f.function == "load_all" for f in _inspect.stack()[1:3]):
            return  # ServerPreset.load_all only downloads the presets' models: nothing to download here
        target = os.environ["SUITE_TARGET"]  # noqa: F821
        model = _json.loads(os.environ["SUITE_MODELS"]).get(self._model_key())  # noqa: F821
        if model is None:
            raise RuntimeError(f"model {self._model_key()!r} is not available offline (no local equivalent)")
        if target == "llama-server":
            self.model_file, self.model_hf_repo, self.model_hf_file = model["gguf"], None, None
            self.offline = False
            self.server_path = os.environ["SUITE_LLAMA_SERVER"]  # noqa: F821
            return super().start(timeout_seconds)
        self._start_codellama(model, timeout_seconds)

    def _model_key(self) -> str:
        """The preset's model, as the test named it (remembered: a restart of the same object finds it again)."""
        if not hasattr(self, "_suite_key"):
            self._suite_key = "/".join(p for p in (self.model_hf_repo, self.model_hf_file, self.model_file)
                                       if p) or "(router: no model)"
        return self._suite_key

    def _start_codellama(self, model: dict, timeout_seconds: int) -> None:
        n_slots = self.n_slots or 1
        flags = [("--port", self.server_port), ("--host", self.server_host), ("--max_batch_size", n_slots),
                 ("--seed", self.seed), ("--temp", self.temperature), ("--chat_format", model.get("chat_format")),
                 ("--ckpt_dir", model.get("ckpt_dir")), ("--n_predict", self.n_predict),
                 ("--alias", self.model_alias), ("--tags", self.model_tags), ("--api-key", self.api_key),
                 ("--slots" if self.server_slots else "--no-slots", True),
                 ("--context-shift", True if self.enable_ctx_shift else None)]
        if self.n_ctx:
            flags.append(("--max_seq_len", self.n_ctx // n_slots))  # llama-server's slots share --ctx-size
        known = set(_json.loads(os.environ["SUITE_FLAGS"]))  # noqa: F821
        args = [os.environ["SUITE_PYTHON"], "-m", "codellama.serve"]  # noqa: F821
        for flag, value in flags:
            if value is None:
                continue
            if flag not in known:  # an older server is measured with the flags it has
                print(f"tests: this server has no {flag}: left out")
                continue
            args += [flag] if value is True else [flag, str(value)]
        print(f"tests: starting server with: {' '.join(args)}")
        self._log = sys.stdout  # noqa: F821
        self.process = subprocess.Popen(args, stdout=sys.stdout, stderr=sys.stdout,  # noqa: F821
                                        cwd=os.environ["SUITE_REPO"])  # noqa: F821
        server_instances.add(self)  # noqa: F821
        start = time.time()  # noqa: F821
        while time.time() - start < timeout_seconds:  # noqa: F821
            try:
                response = self.make_request("GET", "/health", headers={
                    "Authorization": f"Bearer {self.api_key}" if self.api_key else None})
                if response.status_code == 200:
                    self.ready = True
                    return
            except Exception:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"Server process died with return code {self.process.returncode}")
            time.sleep(0.05)  # noqa: F821
        raise TimeoutError(f"Server did not start within {timeout_seconds} seconds")
