"""pqflow: compress large language models by pruning, mixed-precision quantization and recovery tuning."""

__version__ = "0.1.0"
