"""Property-based tests (hypothesis) over every key of every stage config, driven by the configs' own
field declarations: a value outside a key's declared type or range is rejected at load time with a
message naming the key; a value inside is accepted (keys tied to others by a cross-field rule may
instead be rejected, and then the message names the key too).

The examples are derandomised (the same ones on every run, so a CI failure reproduces as it is). To explore
new random examples locally: ``SEMMAE_HYPOTHESIS_EXPLORE=1 pytest tests/test_config_properties.py``; a failure
then prints the ``@reproduce_failure`` line to paste above the test."""

from __future__ import annotations

import math
import os
import typing
from pathlib import Path

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from pipeline.config import (
    ConfigError,
    ExportPartsConfig,
    ExtractConfig,
    LinprobeConfig,
    PartsConfig,
    PrepareConfig,
    PretrainConfig,
    StageConfig,
    TeacherConfig,
    load_pretrain_config,
    load_stage_config,
)

# keys whose valid values can still break a rule that ties them to another key (see the validators)
COUPLED = {
    "prepare": {"train_dir", "val_dir"},
    "teacher": {"img_size", "patch_size"},
    "teacher.train": {"local_size", "global_scale", "local_scale", "mask_ratio"},
    "parts": {"blur_size", "min_share", "num_parts"},
    "linprobe": {"crop_scale", "augment", "mode", "warmup_epochs", "epochs"},
    "pretrain.common": {"img_size", "patch_size", "embed_dim", "num_heads", "decoder_embed_dim", "decoder_num_heads",
                        "batch_size", "accum_steps", "warmup_epochs", "epochs", "shards_url", "crop_scale",
                        "crop_ratio", "betas"},
}  # fmt: skip
SECTIONS = [("prepare", PrepareConfig), ("teacher", TeacherConfig), ("teacher.train", TeacherConfig.model_fields["train"].annotation),
            ("extract", ExtractConfig), ("parts", PartsConfig), ("export_parts", ExportPartsConfig),
            ("linprobe", LinprobeConfig), ("pretrain.common", PretrainConfig)]  # fmt: skip
EXPLORE = os.environ.get("SEMMAE_HYPOTHESIS_EXPLORE") == "1"
HOW = ("examples are " + ("random (SEMMAE_HYPOTHESIS_EXPLORE=1)" if EXPLORE else "derandomised: "
       "SEMMAE_HYPOTHESIS_EXPLORE=1 pytest tests/test_config_properties.py explores random ones"))  # fmt: skip
SKIP = {("pretrain.common", "seed")}  # set per run from pretrain.seeds; a key of common is an error (tested)


def bounds(metadata) -> dict:
    out = {}
    for m in metadata:
        for name in ("gt", "ge", "lt", "le", "min_length", "max_length"):
            if isinstance(m, getattr(at, {"gt": "Gt", "ge": "Ge", "lt": "Lt", "le": "Le", "min_length": "MinLen",
                                          "max_length": "MaxLen"}[name])):  # fmt: skip
                out[name] = getattr(m, name)
    return out


def unwrap(annotation) -> tuple[object, bool]:
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def valid_values(annotation, b: dict):
    kind, optional = unwrap(annotation)
    if typing.get_origin(kind) is typing.Literal:
        s = st.sampled_from(typing.get_args(kind))
    elif kind is bool:
        s = st.booleans()
    elif kind is int:
        lo = b.get("ge", b.get("gt", -(10**6) - 1) + 1)
        hi = b.get("le", b.get("lt", 10**6 + 1) - 1)
        s = st.integers(lo, hi)
    elif kind is float:
        lo, hi = b.get("ge", b.get("gt", -1e6)), b.get("le", b.get("lt", 1e6))
        s = st.floats(lo, hi, exclude_min="gt" in b, exclude_max="lt" in b, allow_nan=False, allow_infinity=False)
    elif kind is str:
        s = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=max(1, b.get("min_length", 0)),
                    max_size=20)  # fmt: skip
    elif typing.get_origin(kind) is list and typing.get_args(kind)[0] is float:
        s = st.lists(st.floats(0.01, 1.0), min_size=b.get("min_length", 0), max_size=b.get("max_length", 4)).map(sorted)
    elif typing.get_origin(kind) is list:
        s = st.lists(st.sampled_from(typing.get_args(typing.get_args(kind)[0])), min_size=max(1, b.get("min_length", 0)),
                     max_size=2, unique=True)  # fmt: skip
    else:
        raise AssertionError(f"no strategy for {annotation}")
    return st.one_of(st.none(), s) if optional else s


def invalid_values(annotation, b: dict):
    kind, optional = unwrap(annotation)
    is_list = typing.get_origin(kind) is list
    wrong_type = st.sampled_from([{"a": 1}, ["x", "y"] if is_list else [1, 2]] + ([] if kind is str else ["text"]))
    options = [wrong_type]
    if typing.get_origin(kind) is typing.Literal:
        options.append(st.text(min_size=1, max_size=8).filter(lambda v: v not in typing.get_args(kind)))
    elif kind is bool:
        options.append(st.sampled_from([0, 1, "yes"]))
    elif kind in (int, float):
        if kind is int:
            options.append(st.floats(-100, 100).filter(lambda v: not float(v).is_integer()))
            options.append(st.booleans())
        span = 10**6
        if "gt" in b:
            options.append(st.floats(b["gt"] - span, b["gt"]) if kind is float else st.integers(int(b["gt"]) - span, int(b["gt"])))
        if "ge" in b:
            options.append(st.floats(b["ge"] - span, b["ge"], exclude_max=True) if kind is float
                           else st.integers(math.ceil(b["ge"]) - span, math.ceil(b["ge"]) - 1))  # fmt: skip
        if "lt" in b:
            options.append(st.floats(b["lt"], b["lt"] + span) if kind is float
                           else st.integers(math.ceil(b["lt"]), math.ceil(b["lt"]) + span))  # fmt: skip
        if "le" in b:
            options.append(st.floats(b["le"], b["le"] + span, exclude_min=True) if kind is float
                           else st.integers(math.floor(b["le"]) + 1, math.floor(b["le"]) + span))  # fmt: skip
    elif kind is str and b.get("min_length"):
        options.append(st.just(""))
    elif typing.get_origin(kind) is list and "min_length" in b:
        options.append(st.lists(st.floats(0.01, 1.0), max_size=b["min_length"] - 1))
    if not optional:
        options.append(st.none())
    return st.one_of(*options)


FIELDS = [(section, name, info) for section, model in SECTIONS for name, info in model.model_fields.items()
          if (section, name) not in SKIP and not (isinstance(info.annotation, type) and issubclass(info.annotation, StageConfig))]  # fmt: skip


def load(tmp: Path, section: str, key: str, value):
    """Write ``{section: {key: value}}`` (defaults elsewhere) and load it as the stage does."""
    path = tmp / "params.yaml"
    if section == "pretrain.common":
        path.write_text(yaml.safe_dump({"pretrain": {"common": {key: value}, "variants": {"v": {}}}}))
        return load_pretrain_config(path, "v", 0)
    if section == "teacher.train":
        path.write_text(yaml.safe_dump({"teacher": {"train": {key: value}}}))
        return load_stage_config(TeacherConfig, path, "teacher").train
    model = dict(SECTIONS)[section]
    path.write_text(yaml.safe_dump({section: {key: value}}))
    return load_stage_config(model, path, section)


@pytest.mark.parametrize(("section", "key", "info"), FIELDS, ids=[f"{s}.{k}" for s, k, _ in FIELDS])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=not EXPLORE, print_blob=EXPLORE)  # fmt: skip
@given(data=st.data())
def test_every_key_accepts_its_valid_values_and_rejects_the_rest_by_name(section, key, info, data, tmp_path):
    note(HOW)
    b = bounds(info.metadata)
    good = data.draw(valid_values(info.annotation, b), label="valid")
    try:
        cfg = load(tmp_path, section, key, good)
        assert getattr(cfg, key) == good
    except ConfigError as exc:
        assert key in COUPLED.get(section, set()), f"{section}.{key} = {good!r} was rejected: {exc}"
        assert key in str(exc)
    bad = data.draw(invalid_values(info.annotation, b), label="invalid")
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, section, key, bad)
    assert f"'{section}.{key}" in str(exc.value) or f"{key}=" in str(exc.value), str(exc.value)


@pytest.mark.skipif(EXPLORE, reason="SEMMAE_HYPOTHESIS_EXPLORE=1: random examples asked for")
def test_the_examples_are_the_same_on_every_run(tmp_path, monkeypatch):
    """Derandomised: an example that fails in CI is drawn again by the next run, here or anywhere."""
    drawn: list = []
    real = valid_values
    monkeypatch.setitem(globals(), "valid_values", lambda *args: real(*args).map(lambda v: drawn.append(v) or v))
    section, key, info = next(f for f in FIELDS if f[:2] == ("prepare", "shard_size"))
    runs = []
    for _ in range(2):
        drawn.clear()
        test_every_key_accepts_its_valid_values_and_rejects_the_rest_by_name(section=section, key=key, info=info,
                                                                             tmp_path=tmp_path)  # fmt: skip
        runs.append(list(drawn))
    assert runs[0] == runs[1] and len(set(runs[0])) > 5, runs
