"""Every preset parses, names a real method and network with valid options, and builds."""

import pytest

from difflab.build import build_model
from difflab.config import RunConfig, list_presets, load_preset
from difflab.errors import UserError


@pytest.mark.parametrize("name", list_presets())
def test_preset_builds(name):
    cfg = load_preset(name)
    gray = any(k in str(cfg.data.get("source", "")) for k in ("digits", "mnist", "idx3"))
    res = int(cfg.data.get("resolution") or 32)
    cfg.image = {"channels": 1 if gray else 3, "resolution": res,
                 "label_dim": 10 if cfg.data.get("use_labels") else 0,
                 "augment_dim": 9 if cfg.train.augment_p > 0 else 0}
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # JSON round trip


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(UserError, match="digits-quick"):
        load_preset("no-such-preset")


def test_unknown_method_option_is_refused():
    cfg = load_preset("digits-quick")
    cfg.method["no_such_option"] = 1
    cfg.image = {"channels": 1, "resolution": 16, "label_dim": 0}
    with pytest.raises(UserError, match="no_such_option"):
        build_model(cfg)


def test_info_prints_a_preset_in_full_and_lists_whole_summaries(capsys):
    import json as _json

    from difflab.cli import main
    from difflab.config import load_preset

    main(["info", "preset", "cifar10-ddpm"])
    assert _json.loads(capsys.readouterr().out) == load_preset("cifar10-ddpm").to_dict()
    main(["info", "digits-sde"])  # a preset name alone does the same
    assert _json.loads(capsys.readouterr().out)["method"]["name"] == "sde-ve"
    main(["info", "presets"])
    out = capsys.readouterr().out
    assert "DDPM (Ho et al. 2020)" in out  # not cut at the first ". "
    main(["info", "samplers"])
    assert "pc " in capsys.readouterr().out
