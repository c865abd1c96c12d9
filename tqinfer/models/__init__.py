"""Architecture registry: HF `model_type` / GGUF `general.architecture` -> model class."""

from __future__ import annotations

from tqinfer.models.llama import LlamaForCausalLM, ModelArgs

ARCHITECTURES = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
}


class UnsupportedArchitecture(ValueError):
    pass


def build_model(config: dict):
    """config.json dict -> (model on the meta-free CPU, ModelArgs)."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    args = ModelArgs.from_dict(config)
    return ARCHITECTURES[model_type], args
