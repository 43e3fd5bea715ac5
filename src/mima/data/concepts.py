"""Concept specs: what to protect (or attack), read from a YAML `concepts:` list or the authors' JSON list.

An entry is `toy:<concept>` (images drawn from the toy world on demand) or a mapping with a name, a
prompt, an image folder and optional class prompt and class images (generated with the base model when
missing) and the prompt erasure maps it onto; a mapping named `toy:<concept>` is that toy concept with its own
class prompt, class images or erasure prompt.
Everything is validated before any heavy work.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from mima.config import read_text
from mima.data.captions import template_words, words
from mima.data.image_folder import read_image_folder, write_image_folder
from mima.errors import ConfigError, DataError
from mima.toy import world as toy_world

TOY_PREFIX = "toy:"
_SPEC_KEYS = ("name", "prompt", "prompts", "descriptions", "images", "class_prompt", "class_images", "erase_to")
_TOY_KEYS = ("name", "class_prompt", "class_images", "erase_to")
_AUTHORS_KEYS = {"instance_prompt": "prompt", "class_prompt": "class_prompt",
                 "instance_data_dir": "images", "class_data_dir": "class_images"}


@dataclass(frozen=True)
class ConceptSpec:
    """One concept. `prompts` are all its phrasings (the first is the training prompt); `descriptions` describe it
    without naming it (what a simulated attacker with prompt `description` trains under); `toy` names a toy concept;
    `erase_to` is the prompt erasure maps its prompts onto (None: its class prompt)."""

    name: str
    prompts: tuple[str, ...]
    images: Path | None = None
    class_prompt: str | None = None
    class_images: Path | None = None
    toy: str | None = None
    descriptions: tuple[str, ...] = ()
    erase_to: str | None = None

    @property
    def prompt(self) -> str:
        return self.prompts[0]

    @property
    def erasure_prompt(self) -> str:
        """What erasure maps the concept's prompts onto: `erase_to`, else its class prompt, else the empty prompt."""
        return self.erase_to or self.class_prompt or ""


def class_folder_name(class_prompt: str) -> str:
    """The folder name of a class prompt's generated images, e.g. `class-a-painting`."""
    return "class-" + re.sub(r"[^a-z0-9]+", "-", class_prompt.lower()).strip("-")


def toy_concept_spec(name: str) -> ConceptSpec:
    """The spec of toy concept `name`; an unknown name is a ConfigError listing the nearest names."""
    concepts = {c.name: c for c in toy_world.toy_concepts()}
    if name not in concepts:
        from difflib import get_close_matches

        close = get_close_matches(name, concepts, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown toy concept '{name}'{hint} valid: {', '.join(concepts)}")
    concept = concepts[name]
    return checked_descriptions(ConceptSpec(name=name, prompts=concept.prompts, class_prompt=concept.class_prompt,
                                            toy=name, descriptions=concept.descriptions))


def parse_concept(entry: Any, base_dir: Path = Path(".")) -> ConceptSpec:
    """One entry of a concept list: `toy:<name>`, a folder path, or a mapping (ours or the authors' keys)."""
    if isinstance(entry, str):
        if entry.startswith(TOY_PREFIX):
            return toy_concept_spec(entry[len(TOY_PREFIX) :])
        folder = _resolve(entry, base_dir)
        return ConceptSpec(name=folder.name, prompts=(f"a photo of {folder.name}",), images=folder)
    if not isinstance(entry, Mapping):
        raise ConfigError(f"a concept entry must be 'toy:<name>', a folder or a mapping; got {entry!r}")
    entry = {_AUTHORS_KEYS.get(k, k): v for k, v in entry.items()}
    toy = isinstance(entry.get("name"), str) and entry["name"].startswith(TOY_PREFIX)
    valid_keys = _TOY_KEYS if toy else _SPEC_KEYS
    unknown = set(entry) - set(valid_keys)
    if unknown:
        kind = "toy concept key(s)" if toy else "concept key(s)"
        raise ConfigError(f"unknown {kind} {sorted(unknown)}; valid: {', '.join(valid_keys)}")
    _check_value_types(entry)
    if toy:
        spec = toy_concept_spec(entry["name"][len(TOY_PREFIX) :])
        class_images = _resolve(entry["class_images"], base_dir) if entry.get("class_images") else None
        return replace(spec, class_prompt=entry.get("class_prompt") or spec.class_prompt, class_images=class_images,
                       erase_to=entry.get("erase_to"))
    prompts = tuple(entry.get("prompts") or ()) or ((entry["prompt"],) if entry.get("prompt") else ())
    if entry.get("prompt") and entry["prompt"] not in prompts:
        prompts = (entry["prompt"], *prompts)
    if not prompts:
        raise ConfigError(f"concept entry {dict(entry)} has no prompt")
    images = entry.get("images")
    return checked_descriptions(ConceptSpec(
        name=str(entry.get("name") or (Path(images).name if images else prompts[0])),
        prompts=prompts,
        images=_resolve(images, base_dir) if images else None,
        class_prompt=entry.get("class_prompt"),
        class_images=_resolve(entry["class_images"], base_dir) if entry.get("class_images") else None,
        descriptions=tuple(entry.get("descriptions") or ()),
        erase_to=entry.get("erase_to"),
    ))


def checked_descriptions(spec: ConceptSpec) -> ConceptSpec:
    """`spec`, once each of its descriptions is a non-empty text that names the concept in no word (its name, or a
    word all its prompts share, as `concept_phrase` finds it in the prompts the attacks rewrite); ConfigError
    otherwise."""
    for text in spec.descriptions:
        if not text.strip():
            raise ConfigError(f"concept '{spec.name}': a description must be a non-empty text")
        phrase = concept_phrase(text, spec, template_words())
        if phrase is not None:
            raise ConfigError(f"concept '{spec.name}': description '{text}' names the concept ('{phrase}'); a "
                              f"description must describe it without its name")
    return spec


def _check_value_types(entry: Mapping[str, Any]) -> None:
    """Every value is text and `prompts` a list of texts: a YAML number or list where text belongs is a mistake."""
    for key, value in entry.items():
        if key in ("prompts", "descriptions"):
            valid = isinstance(value, list) and all(isinstance(text, str) for text in value)
        else:
            valid = value is None or isinstance(value, str)
        if not valid:
            expected = "a list of texts" if key in ("prompts", "descriptions") else "a text (quote it in YAML)"
            raise ConfigError(f"concept key '{key}' must be {expected}, got {value!r}")


def load_concepts(source: str | Path | list[Any]) -> list[ConceptSpec]:
    """Concepts from a YAML file (`concepts: [...]`), the authors' JSON list, or an in-memory list."""
    if isinstance(source, list):
        entries, base_dir = source, Path(".")
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"concept file '{path}' does not exist")
        entries, base_dir = _read_entries(path), path.parent
    specs = [parse_concept(e, base_dir) for e in entries]
    if not specs:
        raise ConfigError(f"the concept list {source} is empty")
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"duplicate concept name(s) {duplicates}; every concept needs its own name")
    return specs


def load_concepts_arg(text: str) -> list[ConceptSpec]:
    """Concepts from a command-line value: a concept file (.yaml/.yml/.json) or comma-separated entries."""
    if Path(text).suffix in (".yaml", ".yml", ".json"):
        return load_concepts(text)
    return load_concepts([entry.strip() for entry in text.split(",") if entry.strip()])


def materialize(spec: ConceptSpec, cache_dir: Path, n_images: int, seed: int = 0) -> ConceptSpec:
    """Give a toy concept an image folder (generated once into `cache_dir/<name>`); others are returned as is."""
    if spec.toy is None or spec.images is not None:
        return spec
    folder = cache_dir / spec.name
    if not (folder / "metadata.csv").is_file():
        images, prompts = toy_world.sample_concept_images(spec.toy, n_images, seed=seed)
        write_image_folder(images, prompts, folder)
    return replace(spec, images=folder)


def naming_words(spec: ConceptSpec, frequent: Collection[str]) -> frozenset[str]:
    """The words that name the concept: those of its name and those all its prompts share, except its class prompt's
    words and `frequent` ones (e.g. {"zorblax", "quenn", "style"} for "a painting in the style of Zorblax Quenn",
    class "a painting", named "zorblax-style")."""
    shared = set.intersection(*(set(words(p)) for p in spec.prompts))
    return frozenset((set(words(spec.name)) | shared) - set(words(spec.class_prompt or "")) - set(frequent))


def concept_phrase(prompt: str, spec: ConceptSpec, frequent: Collection[str]) -> str | None:
    """The part of `prompt` that names the concept: its name where it occurs, else the longest run of its naming
    words ("Zorblax Quenn"); None when the prompt names it in no word."""
    if spec.name in prompt:
        return spec.name
    naming = naming_words(spec, frequent)
    runs, run = [], []
    for match in re.finditer(r"[\w']+", prompt):
        gap = prompt[run[-1].end() : match.start()] if run else ""
        if match.group().lower() in naming and (not run or gap.isspace()):
            run.append(match)
        else:
            runs.append(run)
            run = [match] if match.group().lower() in naming else []
    longest = max([*runs, run], key=len)
    return prompt[longest[0].start() : longest[-1].end()] if longest else None


def validate_images(spec: ConceptSpec) -> None:
    """Decode every image of the concept (and its class images, if given); DataError names the bad file."""
    if spec.images is None:
        raise DataError(f"concept '{spec.name}' has no image folder")
    read_image_folder(spec.images)
    if spec.class_images is not None and spec.class_images.exists():
        read_image_folder(spec.class_images)


def _read_entries(path: Path) -> list[Any]:
    text = read_text(path, "concept file")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse concept file '{path}': {str(e).splitlines()[0]}") from e
    if isinstance(data, Mapping):
        data = data.get("concepts")
    if not isinstance(data, list):
        raise ConfigError(f"concept file '{path}' must hold a list or a mapping with a 'concepts:' list")
    return data


def _resolve(path: str | Path, base_dir: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (base_dir / path)
