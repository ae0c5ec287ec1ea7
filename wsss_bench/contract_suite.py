"""The contract suite (collected by the ``wsss_bench.testing`` pytest plugin; not a test file of ours).

One test, parametrised over the selected registered (kind, name) items, runs the checks of
that kind's interface.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from wsss_bench.cache import ArtifactCache
from wsss_bench.interfaces import ReportTable, TaskDef
from wsss_bench.lazy import pd, torch
from wsss_bench.plugins import load_plugins
from wsss_bench.profiles import load_profile
from wsss_bench.running.runner import RunConfig, Session
from wsss_bench.seeding import set_determinism
from wsss_bench.spec import format_spec, parse_specs
from wsss_bench.testing import select_items, selection

SEED = 0
DEFAULT_TASK = "brats"


def pytest_generate_tests(metafunc) -> None:
    if "contract_item" not in metafunc.fixturenames:
        return

    items = select_items(load_plugins(), selection(metafunc.config))
    metafunc.parametrize("contract_item", items, ids=[f"{k}:{n}" for k, n in items])


@pytest.mark.wsss_contract
def test_plugin_contract(contract_item, contract_host, contexts, request, tmp_path):
    """Dispatch one selected (kind, name) to the checks of its interface."""
    kind, name = contract_item
    checks = {"cams": check_cam, "refiners": check_refiner, "backbones": check_backbone,
              "datasets": check_dataset, "exporters": check_exporter, "executors": check_executor}
    checks[kind](name, contract_host, contexts=contexts, config=request.config, tmp_path=tmp_path)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def contract_host():
    host = load_plugins()
    host.pm.check_pending()
    return host


@pytest.fixture(scope="session")
def contract_cache(tmp_path_factory) -> Path:
    env = os.environ.get("WSSS_BENCH_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("wsss-contract-cache")


class _Contexts:
    """Smoke-profile RunContexts per task; ``fresh=True`` uses a second cache built from scratch."""

    def __init__(self, host, cache: Path, rebuild: Path) -> None:
        self.host, self.cache, self.rebuild = host, cache, rebuild
        self._sessions: dict[bool, object] = {}

    def get(self, task: str, fresh: bool = False):
        if fresh not in self._sessions:
            cfg = RunConfig(profile="smoke", device="cpu", cache_dir=self.cache, out=self.cache / "runs")
            session = Session(cfg, host=self.host)
            if fresh:  # same data, artifacts trained again in an empty store

                session.cache = ArtifactCache(self.rebuild)
            self._sessions[fresh] = session
        return self._sessions[fresh].context(task, SEED)


@pytest.fixture(scope="session")
def contexts(contract_host, contract_cache, tmp_path_factory) -> _Contexts:
    return _Contexts(contract_host, contract_cache, tmp_path_factory.mktemp("wsss-contract-rebuild"))


def _task_for(cls, config) -> str:
    return config.getoption("--wsss-bench-task") or (getattr(cls, "contract_tasks", None) or [DEFAULT_TASK])[0]


def _batch(ctx, n: int = 6):
    idx = ctx.data.split("test")[:n]
    return next(iter(ctx.data.batches(idx, n, device=ctx.device)))


def _variants(cls):
    """For each parameter whose default allows it, a different value of the same type."""
    out = {}
    for key, default in cls.params.items():
        if key in getattr(cls, "contract_fixed_params", ()):
            continue
        if isinstance(default, bool):
            out[key] = not default
        elif isinstance(default, int):
            out[key] = default + 1
        elif isinstance(default, float):
            out[key] = default * 0.5 + 0.125
    return out


def _check_params_round_trip(cls):
    inst = cls()
    assert isinstance(cls.name, str) and cls.name, "plugin class needs a `name`"
    assert isinstance(cls.version, str) and cls.version, "plugin class needs a string `version`"
    for key, value in {**inst.p, **_variants(cls)}.items():
        one = cls(**{key: value})
        (spec,) = parse_specs(format_spec(cls.name, {key: one.p[key]}))
        assert cls(**spec.expand()[0]).p == one.p, f"parameter {key}={value!r} does not round-trip through a spec string"
    assert cls(**parse_specs(inst.spec())[0].expand()[0]).p == inst.p


def _check_keys_change(ctx, cls, stage: str):
    base, _ = ctx.artifact_key(stage, cls())
    for key, value in _variants(cls).items():
        other, _ = ctx.artifact_key(stage, cls(**{key: value}))
        assert other != base, f"cache key did not change when {key} changed"


def _run_cam(ctx, cls, batch):
    set_determinism(ctx.seed("contract"), ctx.device)
    cam = cls()
    cam.ctx = ctx
    with ctx.acting(cam):
        cam.prepare(ctx)
        maps = cam.maps(batch)
    return cam, maps.detach().float().cpu()


# ------------------------------------------------------------------ one test per kind
def check_cam(contract_item, contract_host, contexts, config, **_):
    cls = contract_host.get("cams", contract_item)
    _check_params_round_trip(cls)
    task = _task_for(cls, config)
    ctx = contexts.get(task)
    batch = _batch(ctx)
    cam, maps = _run_cam(ctx, cls, batch)
    size = ctx.data.image_size
    assert cam.mask_rule in ("cam", "otsu") or isinstance(cam.mask_rule, str)
    assert tuple(maps.shape) == (len(batch), size, size), f"maps must be (B, S, S), got {tuple(maps.shape)}"
    assert torch.isfinite(maps).all(), "maps contain NaN or inf"
    assert maps.min() >= -1e-6 and maps.max() <= 1 + 1e-6, "maps must lie in [0, 1]"
    _, again = _run_cam(contexts.get(task, fresh=True), cls, batch)
    assert torch.allclose(maps, again, atol=1e-5), "maps differ between two runs with one seed (retrained from scratch)"
    _check_keys_change(ctx, cls, "maps")


def check_refiner(contract_item, contract_host, contexts, config, **_):
    cls = contract_host.get("refiners", contract_item)
    _check_params_round_trip(cls)
    ctx = contexts.get(_task_for(cls, config))
    batch = _batch(ctx)
    cam, maps = (None, None)
    if cls.needs_cam:
        cam, maps = _run_cam(ctx, contract_host.get("cams", getattr(cls, "contract_cam", "gradcam")), batch)
        maps = maps.to(ctx.device)
    sources = (cam,) if cam is not None else ()
    maps = (maps,) if maps is not None else ()
    ref = cls()
    ref.ctx = ctx
    with ctx.acting(ref):
        ref.prepare(ctx, sources)
        masks = ref.refine(batch, maps, sources)
    size = ctx.data.image_size
    assert tuple(masks.shape) == (len(batch), size, size)
    assert masks.dtype == torch.bool, f"masks must be bool, got {masks.dtype}"
    with ctx.acting(ref):
        again = ref.refine(batch, maps, sources)
    assert torch.equal(masks, again), "refine is not deterministic"
    _check_keys_change(ctx, cls, "masks")


def check_backbone(contract_item, contract_host, contexts, config, **_):
    cls = contract_host.get("backbones", contract_item)
    _check_params_round_trip(cls)
    ctx = contexts.get(_task_for(cls, config))
    batch = _batch(ctx, 2)
    bb = cls()
    bb.ctx = ctx
    with ctx.acting(bb):
        bb.prepare(ctx)
    s = ctx.data.image_size
    assert bb.dim > 0
    g = torch.Generator().manual_seed(0)
    coords = torch.stack([torch.randint(0, 2, (50,), generator=g), torch.randint(0, s, (50,), generator=g),
                          torch.randint(0, s, (50,), generator=g)], 1).to(ctx.device)
    feats = bb.gather(batch.images, coords)
    assert tuple(feats.shape) == (50, bb.dim) and torch.isfinite(feats).all()
    chunk = 97
    rows, covered = [], 0
    for span, part in bb.stream(batch.images[0], chunk):
        assert part.shape[0] <= chunk and part.shape[1] == bb.dim
        assert span.start == covered
        covered = span.stop
        rows.append(part)
    assert covered == s * s, "stream must cover every pixel once, in order"
    dense = torch.cat(rows)
    first = coords[coords[:, 0] == 0]
    assert torch.allclose(dense[first[:, 1] * s + first[:, 2]], bb.gather(batch.images, first), atol=1e-4)


def check_dataset(contract_item, contract_host, tmp_path, **_):
    ds = contract_host.get("datasets", contract_item)()
    assert ds.tasks and all(isinstance(t, TaskDef) and t.task_id == k for k, t in ds.tasks.items())
    assert isinstance(ds.phantom_version, str) and ds.phantom_version
    ds.synthesize(tmp_path, load_profile("smoke"), SEED, 2)
    cases = ds.cases(tmp_path)
    assert len(cases) == 2 and cases == sorted(cases)
    image, labels = ds.load(tmp_path, cases[0])
    channels = {t.channels for t in ds.tasks.values()}
    assert image.ndim == 4 and image.shape[0] in channels and image.shape[1:] == labels.shape
    assert image.dtype == np.float32 and image.min() >= 0 and image.max() <= 1
    assert labels.dtype == np.uint8


def check_exporter(contract_item, contract_host, **_):
    exp = contract_host.get("exporters", contract_item)()
    raw = pd.DataFrame({"method": ["alpha_cam", "beta"], "dice_mean": [0.5, 0.25]})
    table = ReportTable(title="T", header=["Method", "Dice ↑"], rows=[["alpha_cam", "0.500±0.10"], ["beta", "0.250±0.20"]],
                        bold={(0, 1)}, rules_after=[0], footer="gate=label", raw=raw)
    text = exp.export(table)
    assert isinstance(text, str) and text.strip()
    assert "beta" in text and ("0.25" in text or "0.250" in text)
    assert exp.suffix.startswith(".")


def _square(x):
    if x == 2:
        raise ValueError("cell 2 fails")
    return x * x


def check_executor(contract_item, contract_host, **_):
    cls = contract_host.get("executors", contract_item)
    _check_params_round_trip(cls)
    if not getattr(cls, "contract_in_process", cls.name == "local"):
        return  # needs its cluster; the interface checks above still ran
    out = cls().map(_square, [1, 2, 3])
    assert out[0] == 1 and out[2] == 9 and isinstance(out[1], ValueError), "a failing cell must not stop the others"
