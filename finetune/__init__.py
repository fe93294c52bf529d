"""LoRA+ and LoRA-GA on top of peft: what peft 0.21 lacks (see each module's docstring for the exact list)."""

# isort: off
import engine  # noqa: F401  imported first: silences bitsandbytes' import-time warning before peft loads it
# isort: on

from finetune.export import lora_ga_to_lora, lora_ga_to_lora_config, save_adapter
from finetune.loraga import LoraGAError, LoraGAOptions, apply_lora_ga, estimate_gradients, initialize_lora_ga
from finetune.loraplus import check_loraplus_groups, create_loraplus_optimizer, loraplus_param_groups

__all__ = [
    "LoraGAError",
    "LoraGAOptions",
    "apply_lora_ga",
    "check_loraplus_groups",
    "create_loraplus_optimizer",
    "estimate_gradients",
    "initialize_lora_ga",
    "lora_ga_to_lora",
    "lora_ga_to_lora_config",
    "loraplus_param_groups",
    "save_adapter",
]
