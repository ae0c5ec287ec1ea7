"""CLDF (docs/methods/cldf.md): seeds, sampling, decoder, SupCon, k-means, the toy, the plugin.

Every mechanism is checked against an independent reference: a float64 Python loop for
SupCon, hand-built masks for the seeds, scikit-learn's KMeans for the inertia, a toy with a
known answer for the whole method.
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wsss_bench.nn import cldf


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread (conftest)


# ============================================================================ D. SupCon
def naive_supcon(z, labels, tau):
    """Khosla et al. Eq. 2 ('out'), cosine similarity, mean over anchors with positives; plain floats."""
    n = len(z)
    unit = []
    for row in z:
        norm = math.sqrt(sum(v * v for v in row))
        unit.append([v / max(norm, 1e-8) for v in row])
    sim = [[sum(a * b for a, b in zip(unit[i], unit[j])) / tau for j in range(n)] for i in range(n)]
    losses = []
    for i in range(n):
        positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
        if not positives:
            continue
        denom = math.log(sum(math.exp(sim[i][k]) for k in range(n) if k != i))
        losses.append(-sum(sim[i][j] - denom for j in positives) / len(positives))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_equals_a_naive_float64_loop(tau):
    rng = random.Random(7)
    n, o = 37, 5
    labels = [rng.randrange(3) for _ in range(n - 1)] + [3]  # class 3 is a singleton
    rng.shuffle(labels)
    z = [[rng.gauss(0, 1) * rng.choice([0.1, 1.0, 30.0]) for _ in range(o)] for _ in range(n)]
    want = naive_supcon(z, labels, tau)
    got = cldf.supcon_loss(torch.tensor(z, dtype=torch.float64), torch.tensor(labels), tau)
    assert abs(float(got) - want) < 1e-9, (float(got), want)


def test_supcon_gradient_matches_autograd_of_the_plain_formula_and_is_finite_at_small_tau():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(20, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 2, (20,), generator=g)
    assert torch.autograd.gradcheck(lambda x: cldf.supcon_loss(x, labels, 0.1), (z,))
    big = (torch.randn(300, 16, generator=g) * 1e3).requires_grad_(True)
    loss = cldf.supcon_loss(big, torch.randint(0, 2, (300,), generator=g), 0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()


def test_supcon_without_any_positive_is_zero_with_a_gradient_and_a_warning(caplog):
    z = torch.randn(3, 4, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="wsss_bench.nn.cldf"):
        loss = cldf.supcon_loss(z, torch.tensor([0, 1, 2]), 0.1)
    assert float(loss.detach()) == 0.0 and "no anchor has a positive" in caplog.text
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


# ============================================================================ A. seeds, B. sampling
def grid(rows):
    return torch.tensor([[c == "#" for c in r] for r in rows])[None]  # (1, 6, 6)


CAM = grid(["......", ".####.", ".####.", ".####.", "......", "......"])
MG = grid(["......", "......", "..####", "..####", "..####", "......"])


def cells(mask):
    return {(int(i), int(j)) for i, j in torch.nonzero(mask[0]).tolist()}


def test_seed_rules_on_hand_built_masks_give_the_exact_sets():
    everything = {(i, j) for i in range(6) for j in range(6)}
    cam, mg = cells(CAM), cells(MG)
    assert cam == {(i, j) for i in (1, 2, 3) for j in (1, 2, 3, 4)}
    fg, bg = cldf.seed_sets(CAM, MG, "cam+mg")
    assert cells(fg) == {(2, 2), (2, 3), (2, 4), (3, 2), (3, 3), (3, 4)}  # cam AND mg
    assert cells(bg) == everything - cam - mg and len(cells(bg)) == 36 - (12 + 12 - 6)
    fg, bg = cldf.seed_sets(CAM, MG, "cam")
    assert cells(fg) == cam and cells(bg) == everything - cam
    fg, bg = cldf.seed_sets(None, MG, "mg")
    assert cells(fg) == mg and cells(bg) == everything - mg
    with pytest.raises(ValueError, match="needs both"):
        cldf.seed_sets(CAM, None, "cam+mg")


def test_source_masks_follow_each_sources_own_rule():
    maps = torch.tensor([[0.0, 0.2, 0.45, 0.55, 0.9, 1.0]]).repeat(6, 1)[None]  # (1, 6, 6)
    assert cells(cldf.source_mask(maps, "cam")) == {(i, j) for i in range(6) for j in (3, 4, 5)}
    from skimage.filters import threshold_otsu

    m = maps[0].numpy()
    want = m > threshold_otsu(m, nbins=256)
    assert np.array_equal(cldf.source_mask(maps, "otsu")[0].numpy(), want)


def test_seed_composition_counts_bg_seeds_inside_tissue():
    fg, bg = cldf.seed_sets(CAM, MG, "cam+mg")
    images = torch.zeros(1, 2, 6, 6)
    images[0, 1, :3] = 0.5  # tissue = the top three rows (non-zero in some channel)
    comp = cldf.seed_composition(fg, bg, cldf.tissue_mask(images))
    top = {(i, j) for i in range(3) for j in range(6)}
    assert comp["fg"] == 6 and comp["bg"] == 18 and comp["unlabelled"] == 12
    assert comp["bg_in_tissue"] == len(cells(bg) & top) == 9
    assert comp["bg_tissue_share"] == pytest.approx(9 / 18)
    both = cldf.merge_composition(comp, comp)
    assert both["bg"] == 36 and both["bg_tissue_share"] == pytest.approx(9 / 18)


@pytest.mark.parametrize("bg_per_batch,fg_cap", [(5, 3), (5000, 10000), (19, 4), (18, 1)])
def test_sampling_returns_unique_pixels_from_the_right_sets(bg_per_batch, fg_cap):
    fg1, bg1 = cldf.seed_sets(CAM, MG, "cam+mg")
    fg = torch.cat([fg1, torch.zeros_like(fg1)])  # slice 1 has no fg seed
    bg = torch.cat([bg1, ~torch.zeros_like(bg1)])  # ... and 36 bg seeds
    g = torch.Generator().manual_seed(0)
    coords, labels = cldf.sample_pixels(fg, bg, fg_cap, bg_per_batch, g)
    keys = [tuple(c) for c in coords.tolist()]
    assert len(set(keys)) == len(keys)  # without replacement
    n_bg = int(bg.sum())
    assert int((labels == 0).sum()) == min(bg_per_batch, n_bg)
    assert int((labels == 1).sum()) == min(fg_cap, int(fg.sum()))
    for (b, i, j), lab in zip(keys, labels.tolist()):
        assert (fg if lab == 1 else bg)[b, i, j]


def test_bg_sampling_is_uniform_over_the_union_of_the_batch():
    fg = torch.zeros(2, 6, 6, dtype=torch.bool)
    bg = torch.ones(2, 6, 6, dtype=torch.bool)
    hits = torch.zeros(2, 6, 6)
    for k in range(400):
        coords, labels = cldf.sample_pixels(fg, bg, 10, 9, torch.Generator().manual_seed(k))
        hits[coords[:, 0], coords[:, 1], coords[:, 2]] += 1
    assert hits.sum() == 400 * 9
    expected = 400 * 9 / 72  # 50 per pixel
    assert float(hits.min()) > 0.5 * expected and float(hits.max()) < 1.6 * expected
    assert abs(float(hits[0].sum() - hits[1].sum())) < 0.15 * 1800  # both slices share the draw


def test_sampling_skips_a_batch_with_fewer_than_two_pixels():
    fg = torch.zeros(1, 6, 6, dtype=torch.bool)
    bg = torch.zeros(1, 6, 6, dtype=torch.bool)
    assert cldf.sample_pixels(fg, bg, 10, 10) is None
    bg[0, 2, 2] = True
    assert cldf.sample_pixels(fg, bg, 10, 10) is None
    fg[0, 0, 0] = True
    coords, labels = cldf.sample_pixels(fg, bg, 10, 10)
    assert coords.tolist() == [[0, 0, 0], [0, 2, 2]] and labels.tolist() == [1, 0]


def test_bit_packed_seed_masks_round_trip():
    m = torch.rand(3, 7, 7) > 0.5
    assert torch.equal(cldf.unpack_masks(cldf.pack_masks(m), 7), m)


# ============================================================================ C. decoder
@pytest.mark.parametrize("depth,out_dim", [(4, 16), (2, 8), (6, 32)])
def test_decoder_layers(depth, out_dim):
    dec = cldf.PixelDecoder(40, out_dim=out_dim, depth=depth)
    linears = [m for m in dec.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in dec.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(linears) == depth and len(norms) == depth - 1
    assert linears[0].in_features == 40 and [m.out_features for m in linears] == [16] * (depth - 1) + [out_dim]
    kinds = [type(m).__name__ for m in dec.mlp]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d"] * (depth - 1) + ["Linear"]


def test_paper_decoder_is_four_linear_layers_of_16_and_three_batchnorms():
    dec = cldf.PixelDecoder(1024)
    linears = [m for m in dec.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 16), (16, 16), (16, 16), (16, 16)]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in dec.modules()) == 3


def test_standardisation_is_frozen_and_stored_with_the_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) * torch.tensor([1.0, 10, 0.1, 1, 1, 0]) + 3.0  # channel 5 constant
    mom = cldf.Moments()
    for part in x.split(77):
        mom.add(part)
    mean, std = mom.result()
    torch.testing.assert_close(mean, x.double().mean(0).float())
    torch.testing.assert_close(std[:5], x.double().std(0, unbiased=False)[:5].float())
    assert float(std[5]) == pytest.approx(1e-6)  # clamped
    dec = cldf.PixelDecoder(6)
    dec.set_standardisation(mean, std)
    assert {"mean", "std"} <= set(dec.state_dict())
    assert not any(p is dec.mean or p is dec.std for p in dec.parameters())


# ============================================================================ F. k-means
def blobs(seed, n=400, o=5, sep=2.0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.rand(n, generator=g) < 0.35
    x = torch.randn(n, o, generator=g, dtype=torch.float64)
    x[lab, 0] += sep
    return x, lab


@pytest.mark.parametrize("sep", [3.0, 0.5])
def test_kmeans_inertia_equals_scikit_learn_from_the_same_centres(sep):
    from sklearn.cluster import KMeans

    xs, inits = [], []
    for s in range(3):
        x, _ = blobs(s, sep=sep)
        xs.append(x)
        g = torch.Generator().manual_seed(100 + s)
        inits.append(x[torch.randperm(len(x), generator=g)[:2]])
    x, init = torch.stack(xs), torch.stack(inits)  # (3, N, O), (3, 2, O)
    labels, centres, inertia, iters = cldf.lloyd(x, init, max_iter=300, tol=1e-4)
    for b in range(3):
        ref = KMeans(n_clusters=2, init=init[b].numpy(), n_init=1, max_iter=300, tol=1e-4,
                     algorithm="lloyd").fit(x[b].numpy())
        assert float(inertia[b]) == pytest.approx(ref.inertia_, rel=1e-6)
        np.testing.assert_allclose(np.sort(centres[b].numpy(), axis=0), np.sort(ref.cluster_centers_, axis=0),
                                   atol=1e-6)
        # the same partition (up to the cluster ids)
        agree = (labels[b].numpy() == ref.labels_).mean()
        assert max(agree, 1 - agree) == 1.0


def test_kmeans_restarts_reach_the_scikit_learn_optimum_and_respect_the_valid_region():
    from sklearn.cluster import KMeans

    x, lab = blobs(5, sep=4.0)
    labels, inertia = cldf.kmeans(x[None], seeds=[11], restarts=3)
    ref = KMeans(n_clusters=2, n_init=10, random_state=0).fit(x.numpy())
    assert float(inertia[0]) <= ref.inertia_ * (1 + 1e-9)
    valid = torch.zeros(1, len(x), dtype=torch.bool)
    valid[0, :200] = True
    far = x.clone()
    far[200:] += 1000.0  # invalid points far away: they must not move the centres
    lab_v, in_v = cldf.kmeans(far[None], seeds=[11], valid=valid, restarts=2)
    ref_v = KMeans(n_clusters=2, n_init=10, random_state=0).fit(x[:200].numpy())
    assert float(in_v[0]) == pytest.approx(ref_v.inertia_, rel=1e-6)


def test_kmeans_is_seeded_per_slice_not_per_batch():
    xa, _ = blobs(1, sep=0.3)
    xb, _ = blobs(2, sep=0.3)
    both, _ = cldf.kmeans(torch.stack([xa, xb]), seeds=[5, 9], restarts=2)
    alone, _ = cldf.kmeans(xb[None], seeds=[9], restarts=2)
    assert torch.equal(both[1], alone[0])
    again, _ = cldf.kmeans(torch.stack([xa, xb]), seeds=[5, 9], restarts=2)
    assert torch.equal(both, again)


def test_kmeans_pp_picks_valid_points_and_spreads_them():
    x = torch.zeros(1, 10, 2)
    x[0, 7] = torch.tensor([50.0, 0.0])
    x[0, 0] = torch.tensor([-500.0, 0.0])  # invalid: never a centre, and no pull on the D^2 draw
    valid = torch.ones(1, 10, dtype=torch.bool)
    valid[0, 0] = False
    for u in torch.linspace(0, 0.999, 7):
        c = cldf.kmeans_pp(x, valid, 2, torch.tensor([[float(u), float(u)]]))
        assert sorted(c[0, :, 0].tolist()) == [0.0, 50.0]  # the far point is always the other centre


def test_segment_clusters_directions_not_norms():
    g = torch.Generator().manual_seed(0)
    n = 200
    side = torch.rand(n, generator=g) < 0.4
    norms = torch.exp(torch.rand(n, generator=g) * 5)  # 1 .. 150: raw 2-means would split by norm
    direction = torch.where(side[:, None], torch.tensor([1.0, 0.2, 0.0]), torch.tensor([0.0, 0.2, 1.0]))
    emb = (direction * norms[:, None] + 0.02 * torch.randn(n, 3, generator=g))[None]
    seed_fg = (side & (torch.rand(n, generator=g) < 0.3))[None]
    masks = cldf.segment(emb, seed_fg, seed_fg.float(), seeds=[0], restarts=3)
    assert torch.equal(masks[0], side)


@pytest.mark.parametrize("swap", [False, True])
def test_foreground_cluster_finds_the_seeded_group_whatever_the_ids(swap):
    group = torch.zeros(2, 36, dtype=torch.bool)
    group[0, :10] = True
    group[1, 20:] = True
    labels = torch.where(group, 1, 0)
    if swap:
        labels = 1 - labels
    seed_fg = torch.zeros_like(group)
    seed_fg[0, [1, 3, 5]] = True
    seed_fg[0, 30] = True  # one stray seed in the other group: the majority decides
    seed_fg[1, [21, 22]] = True
    score = torch.rand(2, 36)  # irrelevant while seeds exist
    fg_id = cldf.foreground_cluster(labels, seed_fg, score)
    masks = labels == fg_id[:, None]
    assert torch.equal(masks, group)


def test_foreground_cluster_without_seeds_takes_the_higher_mean_cam_then_the_smaller_cluster():
    labels = torch.tensor([[0] * 30 + [1] * 6, [0] * 30 + [1] * 6, [0] * 6 + [1] * 30])
    none = torch.zeros(3, 36, dtype=torch.bool)
    score = torch.zeros(3, 36)
    score[0, :30] = 0.9  # cluster 0 hotter
    score[1, 30:] = 0.9  # cluster 1 hotter
    # slice 2: flat score, a tie: the smaller cluster (id 0, 6 pixels)
    assert cldf.foreground_cluster(labels, none, score).tolist() == [0, 1, 0]


# ============================================================================ the toy
S_TOY, D_TOY, N_TOY = 16, 8, 16


def toy_problem(mu=2.5, nuisance=3.0):
    """fg pixels at +mu and bg at -mu along one direction, N(0, 1) noise there and N(0, 3^2) elsewhere."""
    g = torch.Generator().manual_seed(0)
    truth = torch.zeros(N_TOY, S_TOY, S_TOY, dtype=torch.bool)
    for i in range(N_TOY):
        r, c = torch.randint(2, 8, (2,), generator=g).tolist()
        h, w = torch.randint(4, 8, (2,), generator=g).tolist()
        truth[i, r:r + h, c:c + w] = True
    feats = torch.randn(N_TOY, D_TOY, S_TOY, S_TOY, generator=g)
    feats[:, 1:] *= nuisance
    feats[:, 0] += torch.where(truth, mu, -mu)
    seed_fg = truth & (torch.rand(truth.shape, generator=g) < 0.3)  # 30% of each group
    seed_bg = ~truth & (torch.rand(truth.shape, generator=g) < 0.3)
    return feats, truth, seed_fg, seed_bg


class ToyBatches:
    per_epoch = N_TOY // 4

    def __init__(self, feats):
        self.feats = feats

    def get(self, it):
        epoch, k = divmod(it, self.per_epoch)
        idx = torch.randperm(N_TOY, generator=torch.Generator().manual_seed(epoch))[k * 4:(k + 1) * 4]
        return SimpleNamespace(images=self.feats[idx], index=idx)


def dice(p, t):
    return float(2 * (p & t).sum() / (p.sum() + t.sum()))


def test_end_to_end_toy_beats_its_seeds(tmp_path):
    feats, truth, seed_fg, seed_bg = toy_problem()
    dec = cldf.PixelDecoder(D_TOY)
    gather = lambda b, c: b.images[c[:, 0], :, c[:, 1], c[:, 2]]  # noqa: E731 - the toy's features are explicit
    weights, info = cldf.train_decoder(dec, ToyBatches(feats), lambda b: (seed_fg[b.index], seed_bg[b.index]),
                                       gather, 100, seed=0, work=tmp_path, fg_cap=200, bg_per_batch=200)
    assert info["iterations"] == 100 and info["loss_log"][-1][1] < info["loss_log"][0][1] + 1e-9
    dec.load_state_dict(weights)
    dec.eval()
    flat = feats.reshape(N_TOY, D_TOY, -1).transpose(1, 2)  # (N, S^2, D)
    emb = torch.stack([cldf.embed_stream(iter([(slice(0, 100), f[:100]), (slice(100, None), f[100:])]),
                                         S_TOY ** 2, dec) for f in flat])
    fg_flat = seed_fg.reshape(N_TOY, -1)
    masks = cldf.segment(emb, fg_flat, fg_flat.float(), seeds=list(range(N_TOY))).reshape(truth.shape)
    raw = cldf.segment(flat, fg_flat, fg_flat.float(), seeds=list(range(N_TOY))).reshape(truth.shape)
    d, d_seed, d_raw = dice(masks, truth), dice(seed_fg, truth), dice(raw, truth)
    assert d > 0.9, (d, d_seed, d_raw)
    assert d > d_seed + 0.3 and d > d_raw + 0.3  # learning, not the seeds or raw clustering, did it


def test_standardisation_comes_from_the_pixels_of_the_first_16_batches(tmp_path):
    from wsss_bench.nn.training import iteration_generator

    feats, truth, seed_fg, seed_bg = toy_problem()
    feats = feats * torch.linspace(0.5, 40, D_TOY)[None, :, None, None] + 300.0  # far from standardised
    batches = ToyBatches(feats)
    gather = lambda b, c: b.images[c[:, 0], :, c[:, 1], c[:, 2]]  # noqa: E731
    dec = cldf.PixelDecoder(D_TOY)
    weights, info = cldf.train_decoder(dec, batches, lambda b: (seed_fg[b.index], seed_bg[b.index]), gather, 20,
                                       seed=4, work=tmp_path, fg_cap=30, bg_per_batch=40)
    rows = []
    for it in range(16):  # the reference: the pixels each of the first 16 steps selects
        b = batches.get(it)
        coords, _ = cldf.sample_pixels(seed_fg[b.index], seed_bg[b.index], 30, 40, iteration_generator(4, it))
        rows.append(gather(b, coords))
    rows = torch.cat(rows).double()
    torch.testing.assert_close(weights["mean"], rows.mean(0).float())
    torch.testing.assert_close(weights["std"], rows.std(0, unbiased=False).float())
    assert info["standardisation"]["pixels"] == rows.shape[0] > 16 * 60
    assert all(math.isfinite(v) for _, v in info["loss_log"])


def test_training_resumes_bit_identically(tmp_path):
    feats, truth, seed_fg, seed_bg = toy_problem()
    gather = lambda b, c: b.images[c[:, 0], :, c[:, 1], c[:, 2]]  # noqa: E731
    seeds_for = lambda b: (seed_fg[b.index], seed_bg[b.index])  # noqa: E731

    def train(work, iterations):
        torch.manual_seed(1)
        dec = cldf.PixelDecoder(D_TOY)
        return cldf.train_decoder(dec, ToyBatches(feats), seeds_for, gather, iterations, seed=3, work=work,
                                  fg_cap=50, bg_per_batch=50)

    full, _ = train(tmp_path / "a", 60)
    with pytest.MonkeyPatch.context() as mp:  # a build killed after its checkpoint at 50
        import wsss_bench.nn.training as tr

        mp.setattr(tr, "checkpoint_every", lambda n: 50)
        train(tmp_path / "b", 50)
    resumed, info = train(tmp_path / "b", 60)
    assert info["resumed_from"] == 50
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


# ============================================================================ the plugin
S_SMOKE = 32


class _FakeCtx:
    """Only what source resolution needs: ctx.plugin for the MG the refiner adds."""

    def __init__(self):
        self.asked = []

    def plugin(self, kind, spec):
        from wsss_bench_plugins.mg import MeanGradient

        self.asked.append((kind, spec))
        return MeanGradient()


def _sources(*names):
    from wsss_bench_plugins.gradcam import GradCAM
    from wsss_bench_plugins.layercam import LayerCAM
    from wsss_bench_plugins.mg import MeanGradient

    kinds = {"gradcam": GradCAM, "layercam": LayerCAM, "mg": MeanGradient}
    return tuple(kinds[n]() for n in names)


@pytest.mark.parametrize("names,params,variant,added", [
    (("gradcam",), {}, "cam+mg", True),  # --cam amecam: the paper's CLDF, MG added by the refiner
    (("gradcam", "mg"), {}, "cam+mg", False),  # --cam amecam+mg: the same
    (("mg", "gradcam"), {}, "cam+mg", False),
    (("mg",), {}, "mg", False),  # MG+CL
    (("mg",), {"use_mg": False}, "mg", False),
    (("gradcam",), {"use_mg": False}, "cam", False),  # CAM+CL
])
def test_sources_choose_the_table3_variant(names, params, variant, added):
    from wsss_bench_plugins.cldf import CLDF

    ref, ctx = CLDF(**params), _FakeCtx()
    ref._resolve_sources(ctx, _sources(*names))
    assert ref.variant == variant and ref.mg_added == added
    assert ctx.asked == ([("cams", "mg")] if added else [])
    if variant == "cam+mg":
        assert ref.cam.name == "gradcam" and ref.mg.name == "mg" and ref.score_source is ref.cam
    if variant == "mg":
        assert ref.score_source is ref.mg


@pytest.mark.parametrize("names,params,match", [
    (("gradcam", "mg"), {"use_mg": False}, "use_mg"),
    (("gradcam", "layercam"), {}, "one CAM source"),
    ((), {}, "needs a map source"),
])
def test_contradictory_sources_are_refused(names, params, match):
    from wsss_bench.errors import PluginError
    from wsss_bench_plugins.cldf import CLDF

    with pytest.raises(PluginError, match=match):
        CLDF(**params)._resolve_sources(_FakeCtx(), _sources(*names))


@pytest.mark.parametrize("params,key", [({"kmeans_region": "air"}, "kmeans_region"), ({"tau": 0.0}, "tau"),
                                        ({"out_dim": 0}, "out_dim"), ({"decoder_depth": 0}, "decoder_depth"),
                                        ({"backbone": " "}, "backbone")])
def test_bad_parameters_name_themselves(params, key):
    from wsss_bench.errors import PluginError
    from wsss_bench_plugins.cldf import CLDF

    with pytest.raises(PluginError, match=f"'cldf': parameter {key}="):
        CLDF(**params)


@pytest.fixture(scope="module")
def session(cache_root):
    from wsss_bench.plugins import load_plugins
    from wsss_bench.running.runner import RunConfig, Session

    return Session(RunConfig(profile="smoke", device="cpu", cache_dir=Path(cache_root)), host=load_plugins())


def run_cell(session, cams, method="cldf"):
    """Plan and run one cell's stages in-process; returns the cell state (st.pred: test masks)."""
    from wsss_bench.running.runner import CellState, plan_cells, stage_maps, stage_prepare_refiner, \
        stage_prepare_sources, stage_refine

    ctx = session.context("brats", 0)
    cell = plan_cells(session.host, ["brats"], cams, method, [0])[0]
    st = CellState(ctx, cell, session.profile)
    for stage in (stage_prepare_sources, stage_maps, stage_prepare_refiner, stage_refine):
        stage(st)
    return st


def test_cam_alone_and_cam_plus_mg_are_the_same_cldf(session):
    a = run_cell(session, "gradcam")
    b = run_cell(session, "gradcam+mg")
    assert a.cell == b.cell and a.cell.method == "gradcam+mg+cldf"  # one canonical cell: MG named in the label
    assert not a.refiner.mg_added and not b.refiner.mg_added
    assert a.refiner.decoder is b.refiner.decoder  # one shared model: the same key
    assert np.array_equal(a.pred, b.pred) and a.pred.any()
    rec = a.ctx.records
    assert rec["cldf/variant"]["name"] == "CAM+MG+CL"
    train = rec["cldf/seeds/train"]
    assert train["fg"] > 0 and train["bg"] > 0 and 0 < train["bg_tissue_share"] < 1
    assert train["slices"] == int((a.ctx.data.labels[a.ctx.data.split("train")] == 1).sum())
    assert rec["cldf/seeds/test"]["slices"] == len(a.test)  # every test slice once


def test_training_seeds_are_the_cached_intersection_of_the_two_masks(session):
    from wsss_bench.maps import binarize_cam, otsu_masks

    st = run_cell(session, "gradcam")
    ctx, ref = st.ctx, st.refiner
    seeds = ref._train_seeds(ctx)  # cached: a hit now
    train = ctx.data.split("train")
    pos = np.nonzero(ctx.data.labels[train] == 1)[0]
    assert np.array_equal(seeds["rows"], train[pos])
    cam = binarize_cam(torch.from_numpy(np.array(ctx.maps("gradcam", "train")[pos])))
    mg = otsu_masks(torch.from_numpy(np.array(ctx.maps("mg", "train")[pos])))
    fg = cldf.unpack_masks(seeds["fg"], S_SMOKE)
    bg = cldf.unpack_masks(seeds["bg"], S_SMOKE)
    assert torch.equal(fg, cam & mg) and torch.equal(bg, ~cam & ~mg)


def test_mg_alone_is_mg_plus_cl_and_tissue_region_stays_in_tissue(session):
    st = run_cell(session, "mg")
    assert st.refiner.variant == "mg" and st.ctx.records["cldf/variant"]["name"] == "MG+CL"
    st_t = run_cell(session, "gradcam", "cldf[kmeans_region=tissue]")
    images = st_t.ctx.data.images(st_t.test)
    tissue = (np.asarray(images) != 0).any(axis=1)
    assert st_t.pred.any() and not (st_t.pred & ~tissue).any()


# ---------------------------------------------------------------------------- end to end (CLI)
def _cam_for_e2e():
    from wsss_bench.plugins import load_plugins

    return "amecam" if "amecam" in load_plugins().registries["cams"].names() else "gradcam"


def test_cli_cldf_runs_end_to_end_and_backbones_form_a_grid(run_cli, tmp_path):
    import json

    import pandas as pd

    cam = _cam_for_e2e()
    base = ["run", "--profile", "smoke", "--device", "cpu", "--task", "brats", "--method", "cldf"]
    res = run_cli(*base, "--cam", cam, "--backbone", "[cdm,resnet18]", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    frame = pd.read_parquet(tmp_path / "a" / "results.parquet")
    assert set(frame.method) == {f"{cam}+mg+cldf", f"{cam}+mg+cldf[backbone=resnet18]"}  # a two-cell grid
    test_n = frame[(frame.gate == "none")].groupby("method").size()
    assert (test_n == test_n.iloc[0]).all() and test_n.iloc[0] > 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert len(manifest["cells"]) == 2
    for c in manifest["cells"]:
        assert c["records"]["cldf/variant"]["name"] == "CAM+MG+CL"
        assert c["records"]["cldf/seeds/train"]["fg"] > 0
        assert c["records"]["cldf/seeds/val"]["fg"] > 0  # the validation seeds score the decoder's criterion
    from wsss_bench.nn.training import convergence_of

    import os

    decoders = list(Path(os.environ["WSSS_BENCH_CACHE"]).rglob("cldf_decoder.train.json"))
    assert decoders
    for f in decoders:
        conv = convergence_of(f)["cldf_decoder"]
        assert "SupCon" in conv["criterion"] and conv["higher_is_better"] is False and conv["curve"]
    res = run_cli(*base, "--cam", "gradcam", "--backbone", "[resnet50,unet-encoder]", "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    frame = pd.read_parquet(tmp_path / "b" / "results.parquet")
    assert set(frame.method) == {"gradcam+mg+cldf[backbone=resnet50]", "gradcam+mg+cldf[backbone=unet-encoder]"}
    assert frame.dice.between(0, 1).all()
