"""The HTTP side: a Falcon WSGI app over an engine client.

  engine_client.py   the interface the app needs (EngineClient, RequestStream, events)
  inprocess.py       InProcessEngineClient: an Engine stepped by a thread of this process
  app.py             create_app(config, engine_client, tokenizer, observer=None)
  openai_routes.py   /v1/completions, /v1/chat/completions, /v1/models
  api_routes.py      the in-house /api family
  tokenize_routes.py /tokenize, /detokenize (vLLM's and llama-server's shapes)
  generation.py      request parsing, detokenization, stop strings, n, logprobs, usage
  sse.py, errors.py  event-stream framing; OpenAI-shaped errors
  logs.py            one logging setup for every process; an access line per request
  tracing.py         OpenTelemetry: a span per generation request (optional)

Nothing is imported here, so the engine process can import engine_client
without pulling in Falcon.
"""
