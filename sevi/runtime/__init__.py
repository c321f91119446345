"""The process: the one reader of the environment (runtime_env) and the torchvision shim."""
