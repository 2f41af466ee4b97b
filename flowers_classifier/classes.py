"""The five labels the project predicts, and how folder names map onto them."""

CLASSES: tuple[str, ...] = ("daisy", "dandelion", "rose", "sunflower", "tulip")

# Folder names seen in the wild (TensorFlow's flower_photos uses plurals) -> our labels.
_ALIASES = {"daisies": "daisy", "dandelions": "dandelion", "roses": "rose",
            "sunflowers": "sunflower", "tulips": "tulip"}


def normalize_label(name: str) -> str | None:
    """Map a folder name to one of `CLASSES` (case-insensitive, plurals accepted); None if unknown."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in CLASSES else None
