"""The bundled model's data and training, outside the runtime path: the synthetic scene generator
(`scenes.py`), the trainer (`train_bundled.py`) and the information-flow pilots (`flow_pilot.py`). The server
and the engines never import this package (import contract in pyproject.toml); `bench/` and the tests do."""
