"""The serve limits the CLI names in its help, importable without the `serve` extra."""

MAX_STEPS = 256
# 64 seeds of 256 Heun steps (511 NFE) = 32,704; 256 seeds of 18 guided steps = 17,920.
DEFAULT_MAX_COST = 32_768
MAX_GUIDANCE = 100.0  # |w|; larger weights overflow float32 samples (a 5xx, not a request)
