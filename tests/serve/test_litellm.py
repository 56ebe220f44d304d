"""``litellm`` (what many tools route through) against the server with its ``openai/``, ``text-completion-openai/``,
``ollama/`` and ``ollama_chat/`` providers: each answer equals the library's own. Slow: litellm takes seconds to
import."""

import os

import pytest
from test_serve import DIALOG, NAME, PREFIX, captured_requests, completed, make_service, running

from codellama import Llama

N = 24  # test_serve's infilled() length


@pytest.mark.slow
def test_litellm_providers(monkeypatch):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list at import
    litellm = pytest.importorskip("litellm")
    tiny = Llama.build(max_seq_len=256, max_batch_size=4, device="cpu")
    chat = tiny.chat_completion([DIALOG], temperature=0, max_gen_len=N)[0]["generation"]["content"]
    service = make_service(tiny, max_batch_size=4)
    with running(service, api_key="lite-key") as srv:
        openai_kw = dict(api_base=srv.url + "/v1", api_key="lite-key", max_tokens=N, temperature=0)
        out = litellm.completion(model=f"openai/{NAME}", messages=DIALOG, **openai_kw)
        assert out.choices[0].message.content == chat
        assert out.usage.prompt_tokens_details.cached_tokens >= 0
        streamed = litellm.completion(model=f"openai/{NAME}", messages=DIALOG, stream=True, **openai_kw)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat
        text = litellm.text_completion(model=f"text-completion-openai/{NAME}", prompt="import os\n", **openai_kw)
        assert text.choices[0].text == completed(tiny, "import os\n")
        ollama_kw = dict(api_base=srv.url, api_key="lite-key", max_tokens=N, temperature=0)
        out = litellm.completion(model=f"ollama_chat/{NAME}", messages=DIALOG, **ollama_kw)
        assert out.choices[0].message.content == chat
        seen = captured_requests(service, monkeypatch)  # litellm renders the messages into a prompt of its own
        out = litellm.completion(model=f"ollama/{NAME}", messages=[{"role": "user", "content": PREFIX}], **ollama_kw)
        [tokens], _ = tiny.generate([seen[-1].prompt], N, temperature=0)
        assert PREFIX in tiny.tokenizer.decode(seen[-1].prompt)
        assert out.choices[0].message.content == tiny.tokenizer.decode_infilling(tokens)
        with pytest.raises(litellm.AuthenticationError):
            litellm.completion(model=f"openai/{NAME}", messages=DIALOG, **{**openai_kw, "api_key": "wrong"})
