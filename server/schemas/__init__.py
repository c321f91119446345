"""Request and response bodies: OpenAI chat completions (`chat`), `/caption` (`caption`), shared parts (`common`)."""
