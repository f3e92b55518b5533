"""socratic_lora: QLoRA for a Japanese Socratic tutor on gemma-2-2b-jpn-it.

The lessons in `lessons/` explain each function; `socratic-lora --help` lists the commands.
"""
from .chat import DialogueError, chat_template, render_chat, tokenize_dialogue
from .data import DataError, load_dialogues, load_split
from .lora import LoraSettings, apply_lora, format_report, lora_config, trainable_report
from .models import default_model_path, get_hf_token, load_default_model, load_model
from .placement import PlacementError, parse_memory, plan_placement, verify_placement
from .quant import QuantSettings, bnb_config, compute_dtype, weight_memory

__version__ = "0.1.0"
__all__ = [
    "DialogueError", "chat_template", "render_chat", "tokenize_dialogue",
    "DataError", "load_dialogues", "load_split",
    "LoraSettings", "apply_lora", "format_report", "lora_config", "trainable_report",
    "default_model_path", "get_hf_token", "load_default_model", "load_model",
    "PlacementError", "parse_memory", "plan_placement", "verify_placement",
    "QuantSettings", "bnb_config", "compute_dtype", "weight_memory",
]
