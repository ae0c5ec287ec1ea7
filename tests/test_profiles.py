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
