import pytest

from dinokit.config import PRESETS, Config, make_config


def test_presets_resolve_and_round_trip(tmp_path) -> None:
    for name in ["default", *PRESETS]:
        cfg = make_config(name)
        cfg.save(tmp_path / "c.json")
        assert Config.load(tmp_path / "c.json") == cfg


def test_overrides_are_typed() -> None:
    cfg = make_config(
        "ci", ["optim.epochs=7", "optim.base_lr=1e-3", "train.compile=true", "crops.local_scale=(0.1,0.3)"]
    )
    assert cfg.optim.epochs == 7 and cfg.optim.base_lr == 1e-3 and cfg.train.compile is True
    assert cfg.crops.local_scale == (0.1, 0.3)
    with pytest.raises(ValueError, match="integer"):
        make_config("ci", ["optim.epochs=2.5"])
    with pytest.raises(KeyError, match="unknown preset"):
        make_config("nope")
    with pytest.raises(ValueError, match="section.key=value"):
        make_config("ci", ["epochs"])


def test_assignment_preset_is_vits8() -> None:
    cfg = make_config("har-vits8")
    assert (cfg.model.arch, cfg.model.patch_size) == ("vit_small", 8)
    assert (cfg.crops.global_size, cfg.crops.local_size, cfg.crops.n_local) == (224, 96, 8)
