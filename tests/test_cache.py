import json

import pytest

from wsss_bench.cache import ArtifactCache, atomic_write_json, source_hash


def test_key_changes_with_every_component():
    base = dict(stage="maps", plugin="gradcam", version="1", source="abc", params={"layer": "layer4"},
                upstream=["k1"], seed=0, data="fp")
    k0 = ArtifactCache.key(**base)
    assert k0 == ArtifactCache.key(**base)
    for field, value in [("stage", "x"), ("plugin", "x"), ("version", "2"), ("source", "abd"),
                         ("params", {"layer": "layer3"}), ("upstream", ["k2"]), ("seed", 1), ("data", "fp2")]:
        assert ArtifactCache.key(**{**base, field: value}) != k0, field


def test_build_once_then_reuse(tmp_path):
    cache = ArtifactCache(tmp_path)
    calls = []

    def build(work):
        calls.append(1)
        (work / "x.txt").write_text("hello")
        return {"n": 1}

    a = cache.build("stage", "k" * 64, build)
    b = cache.build("stage", "k" * 64, build)
    assert not a.hit and b.hit and len(calls) == 1
    assert (b.path / "x.txt").read_text() == "hello"
    forced = ArtifactCache(tmp_path, force=True).build("stage", "k" * 64, build)
    assert not forced.hit and len(calls) == 2


def test_failure_is_never_cached_and_workdir_survives_for_resume(tmp_path):
    cache = ArtifactCache(tmp_path)

    def failing(work):
        (work / "checkpoint").write_text("step 5")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.build("train", "a" * 64, failing)
    assert cache.lookup("train", "a" * 64) is None

    def resuming(work):
        assert (work / "checkpoint").read_text() == "step 5"  # resumes from the checkpoint
        (work / "model").write_text("done")

    built = cache.build("train", "a" * 64, resuming)
    assert (built.path / "model").read_text() == "done" and cache.lookup("train", "a" * 64)


def test_disabled_cache_always_builds(tmp_path):
    cache = ArtifactCache(tmp_path, enabled=False)
    n = []
    for _ in range(2):
        cache.build("s", "b" * 64, lambda w: n.append(1))
    assert len(n) == 2 and not (tmp_path / "s").exists()


def test_atomic_json_and_source_hash(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2], "b": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert source_hash(ArtifactCache) == source_hash(ArtifactCache)
    assert source_hash(ArtifactCache) != source_hash(json)


def test_atomic_files_get_the_umask_mode_not_0600(tmp_path):
    import os
    import stat

    from wsss_bench.cache import atomic_path, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
