"""Plugin loading: entry points (through a fake dist-info), broken plugins, --plugins-dir, registries."""
import subprocess
import sys
import textwrap
import warnings

import pytest

from wsss_bench.errors import PluginError, UserError
from wsss_bench.plugins import PluginLoadWarning, load_plugins
from wsss_bench.registry import Registry
from wsss_bench.spec import parse_specs

CAM_MODULE = textwrap.dedent('''
    from wsss_bench.hookspecs import hookimpl
    from wsss_bench.interfaces import CamSource

    class {cls}(CamSource):
        name = "{name}"
        params = {{"k": 1}}
        def maps(self, batch):
            raise NotImplementedError

    @hookimpl
    def register_cam_sources(register):
        register({cls})
''')


def make_dist(root, dist, module, body, version="1.2.3", ep_name=None):
    """A minimal installed distribution: module file + dist-info with one wsss_bench entry point."""
    (root / f"{module}.py").write_text(body)
    info = root / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[wsss_bench]\n{ep_name or module} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("tp_")]:
        del sys.modules[mod]


def test_builtins_load_through_entry_points():
    host = load_plugins()
    host.pm.check_pending()
    assert {"gradcam"} <= set(host.registries["cams"].names())
    assert {"threshold"} <= set(host.registries["refiners"].names())
    assert {"markdown", "latex", "csv"} <= set(host.registries["exporters"].names())
    assert {"local", "slurm"} <= set(host.registries["executors"].names())
    assert {"brats", "flare21-kidney", "flare21-spleen", "flare21-liver"} <= set(host.tasks())
    info = host.infos["gradcam"]
    assert info.builtin and info.distribution == "wsss-bench" and info.error is None
    assert "cams:gradcam" in info.provides


def test_third_party_entry_point_is_discovered_with_its_distribution(site):
    make_dist(site, "tp-cams", "tp_cam", CAM_MODULE.format(cls="Rand", name="tprandom"))
    host = load_plugins()
    host.pm.check_pending()
    assert host.registries["cams"].entry("tprandom").plugin == "tp_cam"
    assert host.infos["tp_cam"].distribution == "tp-cams" and host.infos["tp_cam"].version == "1.2.3"
    only = load_plugins(only=[])
    assert "tprandom" not in only.registries["cams"] and "gradcam" in only.registries["cams"]


def test_plugin_that_raises_on_import_is_skipped_with_one_warning(site):
    make_dist(site, "tp-broken", "tp_broken", "raise RuntimeError('boom at import')\n")
    with pytest.warns(PluginLoadWarning, match=r"tp_broken.*boom at import"):
        host = load_plugins()
    assert host.infos["tp_broken"].error.endswith("boom at import")
    assert "gradcam" in host.registries["cams"]  # everything else still works
    with pytest.raises(PluginError, match="tp_broken"):
        load_plugins(strict=True)


def test_plugin_whose_hook_raises_is_skipped(site):
    make_dist(site, "tp-hookfail", "tp_hookfail", textwrap.dedent('''
        from wsss_bench.hookspecs import hookimpl
        @hookimpl
        def register_refiners(register):
            raise ValueError("bad registration")
    '''))
    with pytest.warns(PluginLoadWarning, match="raised in register_refiners"):
        host = load_plugins()
    assert "threshold" in host.registries["refiners"]


def test_name_collision_keeps_the_builtin(site):
    make_dist(site, "tp-dup", "tp_dup", CAM_MODULE.format(cls="Dup", name="gradcam"))
    with pytest.warns(PluginLoadWarning, match="already registered"):
        host = load_plugins()
    assert host.registries["cams"].entry("gradcam").plugin == "gradcam"


def test_plugins_dir_loads_loose_files(tmp_path):
    (tmp_path / "mycam.py").write_text(CAM_MODULE.format(cls="Mine", name="mycam"))
    host = load_plugins(plugins_dirs=[tmp_path])
    assert host.registries["cams"].entry("mycam").plugin == "mycam"
    assert host.infos["mycam"].origin.endswith("mycam.py")
    with pytest.raises(UserError, match="not a directory"):
        load_plugins(plugins_dirs=[tmp_path / "missing"])


def test_registry_did_you_mean_and_wildcards():
    reg = Registry("cams", "CAM source")
    for n in ("gradcam", "gradcampp", "layercam"):
        assert reg.add(n, object(), "p") is None
    with pytest.raises(PluginError) as err:
        reg.get("gradcan")
    assert "Did you mean 'gradcam'" in str(err.value) and "layercam" in str(err.value)
    assert [e.name for e in reg.list("grad*")] == ["gradcam", "gradcampp"]
    with pytest.raises(UserError, match="Did you mean 'flare21-kidney'"):
        load_plugins().task("flare21-kidny")


def test_trace_prints_hook_calls(capfd):
    load_plugins(trace=True)
    assert "register_cam_sources" in capfd.readouterr().err


def test_listing_plugins_does_not_import_torch():
    code = ("import sys; from wsss_bench.cli import main\n"
            "try:\n    main(['plugins'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'timm', 'monai', 'pandas') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    assert "gradcam" in out.stdout


def test_cli_trace_flag_prints_hook_calls(monkeypatch):
    from typer.testing import CliRunner

    from wsss_bench import cli

    monkeypatch.setitem(cli._STATE, "host", None)
    result = CliRunner().invoke(cli.app, ["plugins", "--trace"])
    assert result.exit_code == 0
    assert "register_cam_sources" in result.output and "register_refiners" in result.output


HTML_EXPORTER = textwrap.dedent('''
    from wsss_bench.hookspecs import hookimpl
    from wsss_bench.interfaces import Exporter

    class MyHtml(Exporter):
        name = "html"
        suffix = ".html"
        def export(self, table):
            return "<p>third party</p>"

    @hookimpl
    def register_exporters(register):
        register(MyHtml)
''')


def test_a_name_clash_keeps_the_builtin_and_qualifies_the_plugin(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "tp_html.py").write_text(HTML_EXPORTER)
    info = tmp_path / "tp_html-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-html\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[wsss_bench]\ntp_html = tp_html\n")
    try:
        with pytest.warns(PluginLoadWarning) as caught:
            host = load_plugins()
        (message,) = [str(w.message) for w in caught if "html" in str(w.message)]
        assert "kept the built-in as 'html'" in message and "reachable as 'tp-html:html'" in message
        assert host.registries["exporters"].entry("html").plugin != "tp_html"  # the built-in
        mine = host.get("exporters", parse_specs("tp-html:html")[0].name)
        assert mine().export(None) == "<p>third party</p>" and mine.name == "tp-html:html"
        assert "exporters:tp-html:html" in host.infos["tp_html"].provides
        with pytest.raises(PluginError, match="fatal under --strict"):
            load_plugins(strict=True)
    finally:
        import sys

        sys.modules.pop("tp_html", None)
