"""Vision Mamba models: the architecture, the timm registry entries and checkpoint I/O."""

from core.models.loading import infer_config, load_checkpoint, read_state_dict, save_safetensors
from core.models.vim import MODEL_CONFIGS, VimConfig, VisionMamba, create_vim

__all__ = [
    "MODEL_CONFIGS", "VimConfig", "VisionMamba", "create_vim",
    "infer_config", "load_checkpoint", "read_state_dict", "save_safetensors",
]
