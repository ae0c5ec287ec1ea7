"""Diffusion core (docs/methods/diffusion.md): schedules, match(), the CDM and resumable training."""
from __future__ import annotations

import copy

import math

import numpy as np
import pytest
import torch

from fakes import FakeTaskData
from wsss_bench.cache import ArtifactCache
from wsss_bench.context import RunContext
from wsss_bench.interfaces import SliceBatch, TaskDef
from wsss_bench.nn import diffusion as dif
from wsss_bench.profiles import Section, load_profile

MG_REF = list(range(10, 201, 10))
MG_HARNESS = [2, 4, 7, 9, 12, 14, 17, 19, 22, 24, 27, 29, 32, 34, 37, 39, 42, 44, 47, 49]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread (conftest)


def make_ctx(tmp_path, profile="smoke", data=None, **overrides):
    prof = load_profile(profile)
    for key, value in overrides.items():
        prof[key] = Section.of(value)
    task = TaskDef("brats", "brats", None, 4, True, "amecam")
    return RunContext(task, data or FakeTaskData(), prof, 0, "cpu", ArtifactCache(tmp_path / "cache"))


# ---------------------------------------------------------------- schedule and match
def test_match_reproduces_the_methods_values():
    assert dif.match(400) == 99
    assert dif.match([1, 10, 50, 100]) == [0, 2, 12, 24]
    assert dif.match(MG_REF) == MG_HARNESS
    assert dif.harness_timesteps([1, 10, 50, 100], "native") == [1, 10, 50, 100]
    with pytest.raises(ValueError):
        dif.match(4000)


def test_match_is_the_identity_on_a_4000_step_cosine_harness():
    prof = Section.of({"common": {"diffusion_timesteps": 4000, "schedule": "cosine"}})
    assert dif.match(list(range(4000)), profile=prof) == list(range(4000))


def test_match_table_is_monotone_and_within_the_documented_tolerance():
    """Documented tolerance (docs/methods/diffusion.md): match() picks the nearest harness noise
    level (no neighbour is closer), and the noise std sqrt(1 - ab) of the matched index is
    within 0.5% of the reference one on the CDM chain (t_ref 390..400) and within 6% for
    every other quoted t_ref >= 10; t_ref = 1 lies below harness index 0 and maps to 0."""
    ab = dif.harness_alphas_cumprod().numpy()
    refs = sorted(set(range(0, 4000, 7)) | set(range(389, 401)) | {1, 10, 50, 100} | set(MG_REF))
    ts = dif.match(refs)
    assert all(a <= b for a, b in zip(ts, ts[1:])), "match() must be monotone"
    for r, t in zip(refs, ts):
        err = abs(ab[t] - dif.ref_alpha_bar(r))
        for n in (t - 1, t + 1):
            if 0 <= n < len(ab):
                assert err <= abs(ab[n] - dif.ref_alpha_bar(r)), (r, t, n)

    def rel_sd(r):
        sd_ref = math.sqrt(1 - dif.ref_alpha_bar(r))
        return abs(math.sqrt(1 - ab[dif.match(r)]) - sd_ref) / sd_ref

    assert max(rel_sd(r) for r in range(390, 401)) < 0.005
    assert max(rel_sd(r) for r in [10, 50, 100] + MG_REF) < 0.06
    assert dif.ref_alpha_bar(1) > ab[0] and dif.match(1) == 0
    table = dif.match_table([1, 10, 50, 100])
    assert [row["t"] for row in table["rows"]] == [0, 2, 12, 24]
    assert table["t_scale"] == "ref4000" and table["ref_schedule"] == "cosine" and table["t_ref_steps"] == 4000
    assert table["rows"][3]["alpha_bar_ref"] == dif.ref_alpha_bar(100)
    assert table["rows"][3]["alpha_bar"] == pytest.approx(float(ab[24]))


def test_reference_schedules():
    assert dif.ref_alpha_bar(400, "cosine") == pytest.approx(0.972, abs=1e-3)
    assert dif.ref_alpha_bar(400, "linear") == pytest.approx(0.896, abs=1e-3)  # the CLI fallback caveat
    ref = dif.reference_alphas_cumprod("cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ref.shape == (4000,) and float(ref[1234]) == pytest.approx(f(1235 / 4000) / f(0), rel=1e-12)
    assert dif.ref_alpha_bar(-1) == 1.0
    assert dif.match(400, "linear") != dif.match(400, "cosine")


def test_add_noise_is_q_sample_and_timesteps_are_long_vectors():
    ab = dif.harness_alphas_cumprod()
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 99, 999])
    out = dif.add_noise(x0, eps, t)
    want = ab[t].sqrt().float().view(3, 1, 1, 1) * x0 + (1 - ab[t]).sqrt().float().view(3, 1, 1, 1) * eps
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    tt = dif.timesteps(12, 5)
    assert tt.dtype == torch.long and tt.shape == (5,) and bool((tt == 12).all())
    assert float(ab[0]) < 1.0  # index 0 is already slightly noisy


# ---------------------------------------------------------------- the CDM network
def check_unet_against_profile(unet, spec, channels: int) -> None:
    """Every architectural number of docs/methods/diffusion.md / the profile's cdm_unet, block by block."""
    ch, n_res = list(spec.channels), int(spec.res_blocks)
    attn, heads = [bool(a) for a in spec.attention], int(spec.head_channels)
    assert unet.conv_in.conv.in_channels == channels and unet.conv_in.conv.out_channels == ch[0]
    assert unet.out[-1].conv.out_channels == channels  # eps has the image's channels
    lin = [m for m in unet.time_embed if isinstance(m, torch.nn.Linear)]
    assert lin[0].in_features == ch[0] and lin[-1].out_features == 4 * ch[0]
    assert unet.class_embedding.num_embeddings == 2 and unet.class_embedding.embedding_dim == 4 * ch[0]
    assert len(unet.down_blocks) == len(unet.up_blocks) == len(ch)
    for i, blk in enumerate(unet.down_blocks):
        assert len(blk.resnets) == n_res, i
        assert all(r.conv2.conv.out_channels == ch[i] for r in blk.resnets), i
        has_attn = hasattr(blk, "attentions")
        assert has_attn == attn[i], i
        if has_attn:
            assert [a.attn.num_heads for a in blk.attentions] == [ch[i] // heads] * n_res
        last = i == len(ch) - 1
        assert (blk.downsampler is None) == last, i
        if not last:  # resblock_updown: the downsampler is a res block, not a strided conv
            assert hasattr(blk.downsampler, "downsample") and hasattr(blk.downsampler, "conv2")
    up_ch, up_attn = ch[::-1], attn[::-1]
    for i, blk in enumerate(unet.up_blocks):
        assert len(blk.resnets) == n_res + 1, i
        assert all(r.conv2.conv.out_channels == up_ch[i] for r in blk.resnets), i
        assert hasattr(blk, "attentions") == up_attn[i], i
        if up_attn[i]:
            assert [a.attn.num_heads for a in blk.attentions] == [up_ch[i] // heads] * (n_res + 1)
        assert (getattr(blk, "upsampler", None) is None) == (i == len(ch) - 1), i
    assert unet.middle_block.attention.attn.num_heads == ch[-1] // heads
    groups = {m.num_groups for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {int(spec.norm_groups)}


@pytest.mark.parametrize("profile", ["smoke", "cpu", "paper"])
def test_build_cdm_follows_the_profile(profile):
    prof = load_profile(profile)
    if profile == "paper":  # 169M parameters: the structure only, on the meta device
        with torch.device("meta"):
            check_unet_against_profile(dif.build_cdm(prof.cdm_unet, 4), prof.cdm_unet, 4)
        return
    unet = dif.build_cdm(prof.cdm_unet, 4, seed=3)
    check_unet_against_profile(unet, prof.cdm_unet, 4)
    check_unet_against_profile(dif.build_cdm(prof.cdm_unet, 1, seed=3), prof.cdm_unet, 1)  # FLARE
    state = torch.random.get_rng_state()
    again = dif.build_cdm(prof.cdm_unet, 4, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), again.state_dict().values()))
    other = dif.build_cdm(prof.cdm_unet, 4, seed=4)
    assert not torch.equal(unet.conv_in.conv.weight, other.conv_in.conv.weight)
    out = unet(torch.randn(2, 4, 32, 32), timesteps=dif.timesteps(5, 2), class_labels=torch.tensor([0, 1]))
    assert out.shape == (2, 4, 32, 32)


def test_ema_of_the_training_loop(tmp_path):
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def step(it):  # the "optimiser" sets the weight to it + 1
        with torch.no_grad():
            model.weight.fill_(it + 1.0)
        return 0.0

    weights, info = dif.run_resumable(tmp_path, model, opt, 3, step, ema_decay=0.5)
    # e = 0 -> 0.5*0 + 0.5*1 = 0.5 -> 0.5*0.5 + 0.5*2 = 1.25 -> 0.5*1.25 + 0.5*3 = 2.125
    assert float(weights["weight"]) == 2.125 and info["weights"] == "ema"


def test_cdm_training_resumes_bit_identically(tmp_path):
    prof, data = load_profile("smoke"), FakeTaskData(n=24)
    assert dif.checkpoint_every(12) == 50 and dif.checkpoint_every(10**6) == 1000

    def train(work, stop_at=None):
        count = [0]

        def progress(n):
            count[0] += n
            if stop_at is not None and count[0] >= stop_at:
                raise KeyboardInterrupt  # an interrupted build

        model = dif.build_cdm(prof.cdm_unet, 4, seed=1)
        return dif.train_cdm(model, data, prof, "cpu", 7, work, flips=True, progress=progress, iterations=10,
                             checkpoint_interval=4)

    full, info = train(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", stop_at=7)
    assert (tmp_path / "cut" / "checkpoint.safetensors").is_file()  # saved after iteration 4
    resumed, info2 = train(tmp_path / "cut")
    assert info["resumed_from"] is None and info2["resumed_from"] == 4
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert info2["loss_log"] == info["loss_log"]


def test_cdm_training_uses_the_profiles_learning_rate(tmp_path):
    """lr = 0 leaves every weight as initialised (AdamW's decay is lr-scaled); lr > 0 moves them
    and the info records it.  A train_cdm that ignored ``cdm.lr`` fails one of the two."""
    from wsss_bench.profiles import apply_overrides

    data = FakeTaskData(n=16)
    moved = {}
    for lr in (0.0, 1e-3):
        # --set refuses lr = 0 for users; the test sets it on a private copy of the profile
        prof = apply_overrides(load_profile("smoke"), ["cdm.lr=1e-3"])
        prof = copy.deepcopy(prof)
        prof.cdm["lr"] = lr
        model = dif.build_cdm(prof.cdm_unet, 4, seed=1)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        weights, info = dif.train_cdm(model, data, prof, "cpu", 7, tmp_path / str(lr), flips=False, iterations=3)
        assert info["lr"] == lr
        moved[lr] = max(float((weights[k] - init[k]).abs().max()) for k in init)
    assert moved[0.0] == 0.0 and moved[1e-3] > 1e-4


def test_get_cdm_trains_once_caches_safetensors_and_records(tmp_path):
    ctx = make_ctx(tmp_path)
    unet = dif.get_cdm(ctx)
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert dif.get_cdm(ctx) is unet  # memoised
    files = list((tmp_path / "cache").rglob("cdm.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "cache").rglob("checkpoint.*"))
    assert ctx.records["diffusion/schedule"]["harness"] == [1000, "cosine"]
    fresh = make_ctx(tmp_path)
    again = dif.get_cdm(fresh)  # a new context reuses the cached artifact
    assert fresh.cache.events[-1]["hit"] is True
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), again.state_dict().values()))
