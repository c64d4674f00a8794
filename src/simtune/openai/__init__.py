"""The OpenAI wire protocol, in one place: request/answer/stream parsing (protocol), the
aiohttp application and start-up shared by the recording proxy and the server (http), and
the small chat client used by the judge and the evaluation (client)."""
