"""Every profile file loads and validates; aliases resolve; errors quote the bad value."""

from __future__ import annotations

import dataclasses

import pytest

from compressor.errors import CompressorError
from compressor.profiles import all_profiles, list_profiles, load_profile, parse_profile, profiles_dir

EXPECTED = {"jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "jetson-xavier-nx", "jetson-nano", "t4", "a10",
            "a100", "h100", "cpu"}


def test_all_expected_profiles_exist():
    assert EXPECTED <= set(list_profiles())


@pytest.mark.parametrize("name", sorted(p.stem for p in profiles_dir().glob("*.toml")))
def test_profile_file_valid(name):
    profile = parse_profile(profiles_dir() / f"{name}.toml")
    assert profile.name == name and profile.description
    assert profile.kind in ("gpu", "cpu", "jetson")
    assert profile.peak_fp16_tflops > 0 and profile.memory_bandwidth_gbs > 0 and profile.peak_int8_tops >= 0
    assert profile.default_precision in ("fp32", "fp16", "int8")
    assert profile.alignment() >= 1
    if profile.kind != "cpu":
        assert profile.sources and all(s["url"].startswith("https://") for s in profile.sources)
        assert "dense" in profile.peak_figures
        assert profile.tensorrt
    dataclasses.replace(profile)  # frozen dataclass
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.name = "x"


@pytest.mark.parametrize("alias,name", [("jetson", "jetson-orin-nano"), ("orin", "jetson-agx-orin"),
                                        ("orin-nx", "jetson-orin-nx"), ("xavier-nx", "jetson-xavier-nx"),
                                        ("nano", "jetson-nano"), ("tesla-t4", "t4"), ("JETSON", "jetson-orin-nano"),
                                        ("h100", "h100")])
def test_aliases_resolve(alias, name):
    assert load_profile(alias).name == name


def test_jetson_alias_in_exactly_one_file():
    owners = [p.name for p in all_profiles().values() if "jetson" in p.aliases]
    assert owners == ["jetson-orin-nano"]


def test_unknown_name_lists_choices():
    with pytest.raises(CompressorError) as info:
        load_profile("tpu-v9")
    message = str(info.value)
    assert "\n" not in message and "'tpu-v9'" in message
    for name in EXPECTED:
        assert name in message


def _write(tmp_path, name, **changes):
    text = (profiles_dir() / "t4.toml").read_text().replace('name = "t4"', f'name = "{name}"')
    for key, value in changes.items():
        lines = [f"{key} = {value}" if line.startswith(f"{key} =") else line for line in text.splitlines()]
        text = "\n".join(lines)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("key,value,quoted", [
    ("kind", '"tpu"', "'tpu'"), ("peak_fp16_tflops", "-3.0", "-3.0"), ("channel_alignment_fp16", "6", "6"),
    ("default_precision", '"fp8"', "'fp8'"), ("compute_capability", '"eight"', "'eight'"),
    ("tensorrt", '"yes"', "'yes'"), ("memory_bandwidth_gbs", '"fast"', "'fast'"),
])
def test_validation_quotes_value_and_file(tmp_path, key, value, quoted):
    path = _write(tmp_path, "bad", **{key: value})
    with pytest.raises(CompressorError) as info:
        parse_profile(path)
    message = str(info.value)
    assert str(path) in message and key in message and quoted in message


def test_validation_missing_field_and_name_mismatch(tmp_path):
    path = _write(tmp_path, "other")
    path.write_text(path.read_text().replace("dla_cores = 0", ""))
    with pytest.raises(CompressorError, match="missing field.*dla_cores"):
        parse_profile(path)
    wrong = tmp_path / "renamed.toml"
    wrong.write_text((profiles_dir() / "t4.toml").read_text())
    with pytest.raises(CompressorError, match="name = 't4'"):
        parse_profile(wrong)


def test_alias_clash_is_reported(tmp_path, monkeypatch):
    _write(tmp_path, "t4clone")
    (tmp_path / "t4.toml").write_text((profiles_dir() / "t4.toml").read_text())
    monkeypatch.setenv("COMPRESSOR_PROFILES", str(tmp_path))
    with pytest.raises(CompressorError, match="alias"):
        load_profile("t4")
