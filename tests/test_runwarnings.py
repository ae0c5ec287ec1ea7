"""Plugin warnings: one clean line on stderr, recorded for the manifest and the report."""
from __future__ import annotations

import warnings

from wsss_bench import runwarnings


def _warn_like_a_plugin(text):
    # what plugins/amecam.py does: a UserWarning attributed to its caller
    warnings.warn_explicit(text, UserWarning, "/x/plugins/amecam.py", 166, module="wsss_bench_plugins.amecam")


def test_a_plugin_warning_is_one_clean_line_and_recorded(capsys):
    text = "amecam: the deletion test cannot tell the polarity apart\n (drop+ 0.0012, drop- 0.0011); using s = +1 [sic]"
    with runwarnings.capture() as seen:
        _warn_like_a_plugin(text)
    err = capsys.readouterr().err
    assert err == ("warning: amecam: the deletion test cannot tell the polarity apart (drop+ 0.0012, drop- 0.0011); "
                   "using s = +1 [sic]\n")
    assert "UserWarning" not in err and "amecam.py:166" not in err
    assert seen == [{"category": "UserWarning", "message": err[len("warning: "):].strip(), "source": "plugin amecam"}]


def test_nested_captures_both_record_and_outside_is_untouched(capsys):
    with runwarnings.capture() as outer:
        with runwarnings.capture() as inner:
            warnings.warn("layercam: gridded layers", UserWarning)
    assert outer == inner and len(inner) == 1 and inner[0]["source"].endswith("test_runwarnings")
    assert capsys.readouterr().err.count("warning: layercam") == 1
    assert warnings.showwarning is not runwarnings._show
