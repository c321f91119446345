"""The SEVI method: the alignment operator, contrastive decoding, the sampler, telemetry counters (torch
alone), and the knob (conservativeness -> numbers; no torch)."""
