from pathlib import Path

import pytest

from wsss_bench.errors import UserError
from wsss_bench.profiles import PROFILE_NAMES, load_profile, markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs" / "profiles.md"


def test_docs_table_matches_the_profile_file():
    assert markdown_table() in DOCS.read_text(), "docs/profiles.md is stale: regenerate it with `wsss-bench profiles`"


def test_every_profile_has_every_knob():
    knobs = set(load_profile("paper")) - {"name", "common"}
    for name in PROFILE_NAMES:
        assert set(load_profile(name)) - {"name", "common"} == knobs, name


def test_protocol_values():
    cpu, smoke, paper = load_profile("cpu"), load_profile("smoke"), load_profile("paper")
    assert (paper.image_size, cpu.image_size, smoke.image_size) == (256, 64, 32)
    assert cpu.cam_classifier.channels == [16, 32, 64, 128] and cpu.cam_classifier.output_stride == 8
    assert cpu.cdm.iterations == 3000 and paper.cdm.iterations == 300000
    assert len(paper.mg.t_ref) == 20 and cpu.mg.t_ref[0] == 20 and smoke.mg.t_ref == [100, 200]
    assert paper.common.cdm_tau == 0.95


def test_unknown_profile_is_a_user_error():
    with pytest.raises(UserError, match="choose one of smoke, cpu, paper"):
        load_profile("fast")


def test_overrides_change_values_keep_types_and_name_bad_keys():
    from wsss_bench.profiles import apply_overrides

    cpu = load_profile("cpu")
    short = apply_overrides(cpu, ["cdm.iterations=200", "image_size=32", "mg.t_ref=[100, 200]"])
    assert short.cdm.iterations == 200 and short.image_size == 32 and short.mg.t_ref == [100, 200]
    assert cpu.cdm.iterations == 3000  # the original is untouched
    assert short.overrides == ["cdm.iterations=200", "image_size=32", "mg.t_ref=[100, 200]"]
    with pytest.raises(UserError, match="has no value 'cdm.nope'"):
        apply_overrides(cpu, ["cdm.nope=1"])
    with pytest.raises(UserError, match="is int"):
        apply_overrides(cpu, ["cdm.iterations=many"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        apply_overrides(cpu, ["cdm.iterations"])


def test_cpu_phantom_splits_can_rank():
    """docs/protocol.md §10: every cpu-profile phantom test split holds >= 10 cases (the measured
    positive-slice counts, >= 150 per task, are in docs/profiles.md)."""
    cpu = load_profile("cpu")
    for key, phantom in (("brats", cpu.brain_phantom), ("flare", cpu.abdomen_phantom)):
        train, val, test = cpu.phantom_split[key]
        assert train + val + test == phantom.cases and test >= 10 and val >= 3
