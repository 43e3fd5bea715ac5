"""Model families mima supports, read from a pipeline folder's `model_index.json`."""

from __future__ import annotations

import json
from pathlib import Path

from mima.errors import ModelError

# Pipeline class -> the family it is. SD 1.x and 2.x share one pipeline class and differ only in configs (text width,
# prediction type), which mima reads from the components.
FAMILIES = {"StableDiffusionPipeline": "Stable Diffusion 1.x / 2.x"}


def pipeline_class(folder: str | Path) -> str:
    """The `_class_name` of the pipeline in `folder`; an unsupported one is a ModelError naming the supported ones."""
    index = Path(folder) / "model_index.json"
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read '{index}': {e}") from e
    if name not in FAMILIES:
        supported = ", ".join(f"{cls} ({family})" for cls, family in FAMILIES.items())
        raise ModelError(f"'{folder}' holds a {name}, which mima does not support; supported: {supported}")
    return name
