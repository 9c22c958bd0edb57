"""elmm_ray: Ray-distributed training of efficient multimodal LLMs for multimodal KG completion."""

__version__ = "0.1.0"
