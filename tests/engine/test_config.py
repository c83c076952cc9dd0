import pytest

from groupdistil.config import ENGINE_DEFAULTS, deep_merge, parse_set, validate
from groupdistil.errors import UserError

SCHEMA = deep_merge(ENGINE_DEFAULTS, {"data": {"image_size": 64}, "method_args": {"eta": 0.01}})


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(UserError, match=r"unknown config key 'train.lrr'.*valid keys at train: .*lr"):
        validate({"train": {"lrr": 0.1}}, SCHEMA, "x.yaml")


def test_wrong_type_names_key():
    with pytest.raises(UserError, match=r"x.yaml: config key 'train.max_steps' must be of type int"):
        validate({"train": {"max_steps": "many"}}, SCHEMA, "x.yaml")
    with pytest.raises(UserError, match="must be a mapping"):
        validate({"train": 3}, SCHEMA, "x.yaml")


def test_int_accepted_for_float_and_bool_strict():
    validate({"train": {"lr": 1}}, SCHEMA, "x")
    with pytest.raises(UserError):
        validate({"train": {"amp": 1}}, SCHEMA, "x")


def test_parse_set_nested_and_typed():
    assert parse_set(["train.lr=0.5", "method=kd", "data.image_size=32"]) == {
        "train": {"lr": 0.5}, "method": "kd", "data": {"image_size": 32}}
    with pytest.raises(UserError, match="key=value"):
        parse_set(["train.lr"])
