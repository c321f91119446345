"""What several test modules share, one module per topic (fixtures stay in the conftest files, which import these).

- `repo`: where the repository and the bundled model are.
- `tiny_models`: the sizes of the tiny random model of each family (built by sevi/testing/tiny.py).
- `images`: random test images, their PNG bytes and data URIs, chat messages carrying them, the long request's image.
- `waiting`: `eventually()`, the one poll-until-deadline loop of the tests.
- `live_server`: `LiveServer` (the app under uvicorn in a thread) and the settings the HTTP tests start from.
- `request_load`: a load of requests in flight when an engine dies or the server stops, and how they must end.
- `engines`: starting an engine, running requests through it, the mixed batch checked against the reference engine.
- `vllm_plugin`: the vLLM plugin's logits processor and paged caches, built as vLLM's worker builds them.
- `presets`: knob presets documents and model folders that carry them.
- `batch`: the batch command's tests: image folders on disk, its settings beside a server's, results by key.
"""
