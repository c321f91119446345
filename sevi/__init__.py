"""sevi-serve below the HTTP layer, by role: the method (method/), its kernels (kernels/), model families
(families.py), the process's environment and torchvision shim (runtime/), the engines (engines/: API,
reference engine, vLLM engine and plugin), evaluation data (evaluation/) and tiny test models (testing/)."""

from sevi.runtime.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()
