"""maestro's errors survive pickling (Ray ships them from worker to driver) and reach the user as
the last line of the output; Ray's wrappers are unwrapped down to the worker's own error."""

from __future__ import annotations

import pickle

import pytest

from maestro import cli, errors
from maestro.errors import ConfigError, MaestroError

EXAMPLES = {
    errors.ConfigError: ("data.inputs", "dem", "modalities stored in /shards (['aerial'])"),
}


def _every_error_class() -> list[type[MaestroError]]:
    return errors._subclasses(MaestroError)


@pytest.mark.parametrize("cls", _every_error_class(), ids=lambda c: c.__name__)
def test_every_maestro_error_round_trips_through_pickling_with_its_message(cls):
    error = cls(*EXAMPLES.get(cls, ("shard s3://b/train-000003.tar: bad header",)))
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls and str(back) == str(error) and back.args == error.args
    if cls is ConfigError:
        assert (back.key, back.value, back.expected) == (error.key, error.value, error.expected)


def test_ray_serialization_keeps_the_config_error_whole():
    import ray.cloudpickle

    error = ConfigError("data.inputs", "dem", "modalities stored in the shards")
    back = ray.cloudpickle.loads(ray.cloudpickle.dumps(error))
    assert str(back) == "config key 'data.inputs': got 'dem'; expected modalities stored in the shards"


def test_by_name_raises_the_recorded_class_with_its_message():
    e = errors.by_name("DataError", "bad shard")
    assert type(e) is errors.DataError and str(e) == "bad shard"
    assert type(errors.by_name("NoSuchError", "x")) is MaestroError


def test_a_maestro_error_is_the_last_line_of_the_output(capsys):
    code = cli.main(["config", "configs/demo.yaml", "mask.ratio=1.5"])
    _, err = capsys.readouterr()
    assert code == 2
    assert (
        err.strip().splitlines()[-1]
        == "error: config key 'mask.ratio': got 1.5; expected a fraction in [0, 1)"
    )
