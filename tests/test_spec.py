import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsss_bench.errors import UserError
from wsss_bench.spec import format_spec, parse_specs


def test_plain_name():
    (spec,) = parse_specs("gradcam")
    assert spec.name == "gradcam" and spec.expand() == [{}]


def test_grid_is_cartesian_product_in_order():
    (spec,) = parse_specs("cldf[tau=[0.1,0.5],decoder_depth=[2,4,6]]")
    cells = spec.expand()
    assert len(cells) == 6
    assert cells[0] == {"tau": 0.1, "decoder_depth": 2}
    assert cells[-1] == {"tau": 0.5, "decoder_depth": 6}


def test_several_specs_and_scalar_types():
    specs = parse_specs("gradcam, scorecam[variant=library,chunk=64,fast=true,x=none,y='007']")
    assert [s.name for s in specs] == ["gradcam", "scorecam"]
    assert specs[1].expand() == [{"variant": "library", "chunk": 64, "fast": True, "x": None, "y": "007"}]


def test_list_valued_parameter_uses_plus():
    (spec,) = parse_specs("layercam[layers=layer2+layer4]")
    assert spec.expand() == [{"layers": "layer2+layer4"}]


@pytest.mark.parametrize("bad", ["grad[cam", "gradcam[layer=]", "x[a=1,a=2]", "[a=1]", "x[a=[1,[2]]]", "x]", ""])
def test_malformed_specs_raise_user_error(bad):
    with pytest.raises(UserError) as err:
        parse_specs(bad)
    assert "spec" in str(err.value)


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True),
                       st.one_of(st.integers(-99, 99), st.booleans(), st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)
                                 .filter(lambda s: s not in ("true", "false", "none", "null"))), max_size=4))
def test_format_then_parse_round_trips(params):
    (spec,) = parse_specs(format_spec("plug", params))
    assert spec.expand() == [params]


