"""The OpenAI-compatible server: app.py (routes, `serve`), http.py (errors, JSON bodies, the gate), schemas.py
(request bodies), prepare.py (a body to a checked scheduler request), jobs.py (requests in flight, the loop's
thread), stream.py (SSE or whole responses), responses.py (OpenAI's response objects), reply.py, reasoning.py and
tool_calls.py (a chat reply to reasoning_content, content and tool_calls), grammars.py (constrained tool calls and
JSON), metrics.py (Prometheus), tokenizer_process.py (long prompts tokenized off the event loop)."""
