"""Typed records (localrun.records), which the settings and the catalog manifests are built on: values from
text are coerced, bad ones are refused naming the field, and records survive the trip to the model process."""

from __future__ import annotations

import pickle
from typing import Literal

import pytest

from localrun.models.catalog import CatalogModel, Manifest
from localrun.records import Record, RecordError, build, fields, setting
from localrun.settings import LoadOptions, SamplingParams


class Pet(Record):
    name: str = setting(pattern=r"^[a-z]+$")
    kind: Literal["cat", "dog"] = setting("cat")


class Owner(Record):
    age: int | None = setting(None, ge=0, le=150)
    weight: float = setting(70.0, gt=0)
    likes: tuple[str, ...] = setting(())
    pets: tuple[Pet, ...] = setting((), min_items=0)
    home: Pet | None = setting(None)


def test_text_is_coerced_the_way_forms_and_flags_write_it() -> None:
    owner = build(Owner, {"age": " 41 ", "weight": "62.5", "likes": ["tea"], "pets": [{"name": "tom"}]})
    assert owner.age == 41 and owner.weight == 62.5 and owner.likes == ("tea",)
    assert owner.pets == (Pet(name="tom", kind="cat"),) and isinstance(owner.pets[0], Pet)
    assert Owner(weight=3).weight == 3.0 and isinstance(Owner(weight=3).weight, float)
    assert build(LoadOptions, {"static_cache": "yes", "n_ctx": 1024.0}).static_cache is True
    assert SamplingParams().replace(seed=None, stop=["a", "b"]).stop == ("a", "b")


@pytest.mark.parametrize(
    ("data", "loc", "message"),
    [
        ({"age": -1}, "age", "greater than or equal to 0"),
        ({"age": 2.5}, "age", "a valid integer"),
        ({"age": True}, "age", "a valid integer"),
        ({"weight": 0}, "weight", "greater than 0"),
        ({"weight": "heavy"}, "weight", "a valid number"),
        ({"likes": "tea"}, "likes", "a valid tuple"),
        ({"likes": ["tea", 3]}, "likes.1", "a valid string"),
        ({"pets": [{"name": "Tom"}]}, "pets.0.name", "match pattern"),
        ({"pets": [{"name": "tom", "kind": "cow"}]}, "pets.0.kind", "'cat' or 'dog'"),
        ({"pets": [{"kind": "dog"}]}, "pets.0.name", "Field required"),
        ({"home": {"name": "rex", "legs": 4}}, "home.legs", "Extra inputs are not permitted"),
        ({"hair": "grey"}, "hair", "Extra inputs are not permitted"),
    ],
)
def test_bad_values_name_the_field(data: dict, loc: str, message: str) -> None:
    with pytest.raises(RecordError, match=message) as err:
        build(Owner, data)
    assert err.value.loc == loc


def test_the_constructor_checks_too_and_records_are_frozen_hashable_and_picklable() -> None:
    with pytest.raises(RecordError, match="temperature"):
        SamplingParams(temperature=-1)
    params = SamplingParams(temperature=0.0, stop=("###",), seed=3)
    with pytest.raises(AttributeError):
        params.temperature = 1.0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(params)) == params and hash(params) == hash(params.replace())
    assert list(fields(Owner)) == ["age", "weight", "likes", "pets", "home"] and fields(Owner)["likes"].is_list


def test_catalog_manifests_are_records() -> None:
    model = {
        "name": "tiny",
        "description": "d",
        "license": "mit",
        "architecture": "llama",
        "parameter_count": 1,
        "context_length": 8,
        "variants": [{"format": "gguf", "quant": "Q8_0", "repo": "a/b", "filename": "x.gguf"}],
        "recommended": {"temperature": 0.2, "system": "Be brief."},
    }
    manifest = build(Manifest, {"family": "f", "models": [model]})
    assert isinstance(manifest.models[0], CatalogModel) and manifest.models[0].recommended.sampling() == {
        "temperature": 0.2
    }
    with pytest.raises(RecordError) as err:
        build(Manifest, {"family": "f", "models": [{**model, "recommended": {"top_p": 0}}]})
    assert err.value.loc == "models.0.recommended.top_p"
    with pytest.raises(RecordError, match="at least 1 item"):
        build(Manifest, {"family": "f", "models": []})
