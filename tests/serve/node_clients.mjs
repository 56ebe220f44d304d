// The server through the npm clients editors and tools use: `openai`, `ollama` and Continue's
// `@continuedev/openai-adapters` (its FIM stream, chat stream and completions). Run by test_node_clients.py from a
// folder holding those packages: `node node_clients.mjs '<json config>'`; prints one JSON object of results.
import { constructLlmApi } from "@continuedev/openai-adapters";
import { Ollama } from "ollama";
import OpenAI from "openai";

const { url, model, key, prefix, suffix, dialog, n } = JSON.parse(process.argv[2]);
const out = {};

async function joined(stream, text) {
  let all = "";
  for await (const chunk of stream) all += text(chunk) ?? "";
  return all;
}

// openai: completions with suffix (infilling), chat streamed, models.
const oai = new OpenAI({ baseURL: `${url}/v1`, apiKey: key, maxRetries: 0 });
out.openai_infill = (await oai.completions.create({ model, prompt: prefix, suffix, max_tokens: n, temperature: 0 }))
  .choices[0].text;
out.openai_chat = await joined(
  await oai.chat.completions.create({ model, messages: dialog, max_tokens: n, temperature: 0, stream: true }),
  (c) => c.choices[0]?.delta?.content);
const chat = await oai.chat.completions.create({ model, messages: dialog, max_tokens: 2, temperature: 0 });
out.openai_fingerprint = chat.system_fingerprint;
out.openai_cached = chat.usage.prompt_tokens_details.cached_tokens;
out.openai_models = (await oai.models.list()).data.map((m) => m.id);

// ollama: generate with suffix, chat streamed, list and show; the key through headers.
const oll = new Ollama({ host: url, headers: { Authorization: `Bearer ${key}` } });
out.ollama_infill = (await oll.generate({ model, prompt: prefix, suffix, stream: false,
  options: { temperature: 0, num_predict: n } })).response;
out.ollama_chat = await joined(
  await oll.chat({ model, messages: dialog, stream: true, options: { temperature: 0, num_predict: n } }),
  (c) => c.message.content);
out.ollama_models = (await oll.list()).models.map((m) => m.name);
out.ollama_can_insert = (await oll.show({ model })).capabilities.includes("insert");

// Continue's adapters, OpenAI provider: the FIM stream (/v1/fim/completions), chat stream, FIM spelled as text.
const api = constructLlmApi({ provider: "openai", apiBase: `${url}/v1/`, apiKey: key });
const signal = new AbortController().signal;
out.continue_fim = await joined(
  api.fimStream({ model, prompt: prefix, suffix, max_tokens: n, temperature: 0 }, signal),
  (c) => c.choices[0]?.delta?.content);
out.continue_chat = await joined(
  api.chatCompletionStream({ model, messages: dialog, max_tokens: n, temperature: 0, stream: true }, signal),
  (c) => c.choices[0]?.delta?.content);
out.continue_completion = (await api.completionNonStream(
  { model, prompt: `<PRE> ${prefix} <SUF>${suffix} <MID>`, max_tokens: n, temperature: 0 }, signal)).choices[0].text;
out.continue_models = (await api.list()).map((m) => m.id);

console.log(JSON.stringify(out));
