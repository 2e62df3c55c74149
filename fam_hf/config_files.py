"""Reading the YAML or JSON config files a training command names (torch-free: ``fam-hf compare`` reads them too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_config(path: Path) -> Any:
    """Return the parsed YAML or JSON file at ``path``, or ``None`` where it is no config file that can be read."""
    try:
        text = path.read_text()
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - an argument that only looks like a config file
        return None
