import dataclasses

import pytest

from tessera.config import Config, ConfigError
from tessera.data.prepare import PrepareConfig
from tessera.tokenizer.vq import VQConfig


def test_json_round_trip_preserves_types():
    cfg = VQConfig(channel_mult=(1, 2, 4), resolution=64, beta=0.5)
    back = VQConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.channel_mult, tuple)


def test_nested_round_trip():
    cfg = PrepareConfig(size=64, scorers=("nsfw?max_score=0.5",))
    cfg.filters.min_size = 32
    assert PrepareConfig.from_json(cfg.to_json()) == cfg


def test_unknown_key_raises_with_name():
    with pytest.raises(ConfigError, match="codebok_size"):
        VQConfig.from_dict({"codebok_size": 10})


def test_wrong_type_raises():
    with pytest.raises(ConfigError, match="resolution"):
        VQConfig.from_dict({"resolution": "big"})
    with pytest.raises(ConfigError):
        VQConfig.from_dict({"l2_normalize": 1})


def test_validation_in_post_init():
    with pytest.raises(ValueError, match="multiple of factor"):
        VQConfig(resolution=100)


def test_save_load_file(tmp_path):
    @dataclasses.dataclass
    class C(Config):
        a: int = 1
        b: float | None = None

    C(a=3, b=2.5).save(tmp_path / "c.json")
    assert C.load(tmp_path / "c.json") == C(a=3, b=2.5)
    assert C.from_dict({"b": None}).b is None
