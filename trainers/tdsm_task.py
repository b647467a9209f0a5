"""From a TDSM config to tensors: class prompts -> encoded (cached) text, and the zero-shot feature task."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from trainers.assets import EMBEDDED_DESCRIPTIONS, EMBEDDED_NAMES, default_cache_dir
from trainers.configs import TDSMConfig
from trainers.data import ZSLTask, generate_synthetic_task, load_feature_task
from trainers.errors import InputError
from trainers.prompts import read_prompt_file
from trainers.text import TextFeatures, encode_prompt_sets


def prompt_files(cfg: TDSMConfig) -> list[Path]:
    """[class names, description files...]; the embedded NTU-60 texts for the synthetic task."""
    names = cfg.text.class_names
    if names is None:
        if cfg.data.source == "features":
            raise InputError("text.class_names is required with data.source=features (--class-names FILE)")
        names = EMBEDDED_NAMES
    descriptions = cfg.text.descriptions
    if descriptions is None:
        descriptions = [EMBEDDED_DESCRIPTIONS] if cfg.text.class_names is None else []
    return [Path(names), *map(Path, descriptions)]


def class_prompts(cfg: TDSMConfig) -> list[list[str]]:
    """[class names, descriptions...]: one prompt per class in each set, in the prompt files' order."""
    files = prompt_files(cfg)
    first = cfg.text.num_classes
    names = read_prompt_file(files[0], first=first)
    return [names] + [read_prompt_file(f, expected_count=len(names), first=first) for f in files[1:]]


def encode_class_texts(cfg: TDSMConfig) -> tuple[list[str], TextFeatures]:
    """(class names, text features of every class: prompt files concatenated along channels)."""
    files = prompt_files(cfg)
    sets = class_prompts(cfg)
    names = sets[0]
    cache = Path(cfg.text.cache_dir) if cfg.text.cache_dir else default_cache_dir() / "text"
    return names, encode_prompt_sets(cfg.text.encoder, sets, cfg.text.max_tokens, cache, layer=cfg.text.layer,
                                     pooled=cfg.text.pooled, set_names=[str(f) for f in files])


class TDSMInputs(NamedTuple):
    """What a TDSM run needs besides its config; a sweep builds it once per split and shares it with every trial."""

    task: ZSLTask
    names: list[str]                 # class names, by class id
    text: TextFeatures               # encoded class texts, by class id


def prepare_tdsm(cfg: TDSMConfig) -> TDSMInputs:
    """The zero-shot task, the class names and the encoded class texts a TDSM run needs."""
    if cfg.data.source == "synthetic":
        names, text = encode_class_texts(cfg)
        return TDSMInputs(generate_synthetic_task(cfg.data, text.global_feats), names, text)
    # Features and splits are checked before the text encoder loads, so bad data fails fast.
    names_file = prompt_files(cfg)[0]
    num_classes = len(read_prompt_file(names_file, first=cfg.text.num_classes))
    task = load_feature_task(cfg.data, num_classes, f"the {num_classes} classes of {names_file}")
    names, text = encode_class_texts(cfg)
    return TDSMInputs(task, names, text)
