"""The vLLM engine (vllm_engine.py: LLMEngine in a thread; vllm_process.py: AsyncLLM), its options and liveness
checks, and the plugin vLLM loads in every process (plugin/). Kept import-free: vLLM imports the plugin
package below this one in each of its processes."""
