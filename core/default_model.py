"""The embedded default model (assets/default_model): weights, and the card that says how it was made."""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import StudioError
from core.models import VisionMamba, load_checkpoint

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
WEIGHTS_FILE, CARD_FILE = "model.safetensors", "card.json"
DEFAULT_CHECKPOINT = DEFAULT_MODEL_DIR / WEIGHTS_FILE


def load_card(directory: str | Path = DEFAULT_MODEL_DIR) -> dict:
    path = Path(directory) / CARD_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StudioError(f"model card {path} is missing") from None
    except json.JSONDecodeError as err:
        raise StudioError(f"model card {path} is not valid JSON ({err})") from None


def load_default_model(directory: str | Path = DEFAULT_MODEL_DIR) -> tuple[VisionMamba, dict]:
    """The default model in eval mode and its card."""
    return load_checkpoint(Path(directory) / WEIGHTS_FILE), load_card(directory)
