"""Bulk captioning: a folder, a JSONL manifest or an OpenAI batch file -> JSONL results, at engine speed, resumable,
optionally scaled out on Ray Data (`python -m server.batch`; see `__main__`)."""
