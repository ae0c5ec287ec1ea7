"""One canonical label per cell; other spellings resolve to it; grids show every value."""
from __future__ import annotations

import pytest

from wsss_bench.errors import UserError
from wsss_bench.labels import canonical_method, display_labels, resolve_method
from wsss_bench.plugins import load_plugins


@pytest.fixture(scope="module")
def host():
    return load_plugins()


@pytest.mark.parametrize("spelling,canonical", [
    ("amecam+cldf", "amecam+mg+cldf"),                      # CLDF adds MG itself (use_mg=true)
    ("amecam+mg+cldf", "amecam+mg+cldf"),
    ("amecam+mg+cldf[use_mg=true,out_dim=16]", "amecam+mg+cldf"),
    ("gradcam[layer=layer4]+threshold", "gradcam+threshold"),  # layer4 is the default
    ("layercam[layers=layer2+layer3+layer4]+mg+cldf", "layercam+mg+cldf"),
    ("amecam+cldf[use_mg=false]", "amecam+cldf[use_mg=false]"),  # CAM+CL: no MG
    ("mg+cldf", "mg+cldf"),
    ("fsl", "fsl"),
])
def test_every_spelling_has_one_canonical_label(host, spelling, canonical):
    assert canonical_method(host, spelling) == canonical


def test_resolve_finds_a_label_stored_under_another_spelling(host):
    assert resolve_method(host, "amecam+mg+cldf", ["gradcam+threshold", "amecam+cldf"]) == "amecam+cldf"
    assert resolve_method(host, "amecam+cldf", ["amecam+mg+cldf"]) == "amecam+mg+cldf"
    with pytest.raises(UserError, match="they hold: gradcam"):
        resolve_method(host, "layercam+mg+cldf", ["gradcam+threshold"])
    with pytest.raises(UserError, match="nosuch"):
        resolve_method(host, "nosuch+threshold", ["gradcam+threshold"])


def test_a_grid_shows_the_default_value_on_its_row(host):
    shown = display_labels(host, ["gradcam+threshold", "gradcam[layer=layer3]+threshold", "layercam+threshold",
                                  "fsl", "gradcam+threshold (cpu)"])
    assert shown["gradcam+threshold"] == "gradcam[layer=layer4]+threshold"
    assert shown["gradcam[layer=layer3]+threshold"] == "gradcam[layer=layer3]+threshold"
    assert shown["layercam+threshold"] == "layercam+threshold" and shown["fsl"] == "fsl"
    assert shown["gradcam+threshold (cpu)"] == "gradcam+threshold (cpu)"
