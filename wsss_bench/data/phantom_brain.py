"""Synthetic BraTS-like brain phantom (docs/protocol.md section 11, "Brain").

Writes ``<out>/BraTS2021_{i:05d}/BraTS2021_{i:05d}_{flair,t1,t1ce,t2,seg}.nii.gz``: float32
images, uint8 labels {0, 1 core, 2 oedema, 4 enhancing rim}, LPS-style affine diag(-s, -s, s).
Case i is a pure function of (GENERATOR_VERSION, seed, i): every random draw comes from
``derive_seed(seed, "brats", f"phantom/brain/{i}")``.

Difficulty confounders (section 11, "Difficulty"; calibrated by benchmarks/calibrate_phantoms.py):

- oedema mimics with the oedema's intensities in all four channels: 0-6 small white-matter
  hyperintensities per case, plus a confluent periventricular burden in 40% of cases, plus
  periventricular caps at the ventricle horns in 80% of cases (never labelled);
- enhancing mimics in t1ce as bright as the rim: choroid plexus and a few tubular vessels;
- per-case, per-modality gain U(0.8, 1.2) and gamma U(0.8, 1.25); tumour contrasts jittered per
  case (oedema FLAIR 0.75-0.95); bias-field coefficients U(-0.3, 0.3);
- infiltrative oedema: its signal fades towards the annotated boundary and a faint unlabelled
  halo may continue outside it; detached specks of signal are left unlabelled;
- heterogeneous tumour texture (15%), 3% tissue texture, one-voxel partial-volume blur.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsss_bench.data.phantom_common import (
    Grid,
    ellipsoid_q,
    grid_from,
    log_uniform,
    slice_stats,
    smooth_field,
    stats_ok,
    tube,
    voxel_noise,
    write_nifti,
)
from wsss_bench.seeding import derive_seed

GENERATOR_VERSION = "brain-2"
MODALITIES = ("flair", "t1", "t1ce", "t2")
R_CORE_MAX = 20.0
MAX_ATTEMPTS = 24  # tumour placements tried per case (deterministic), see _place_tumours

# tissue ids of the internal tissue map
BG, CSF, GM, WM, OED, RIM, CORE, WMH, ENH, PVH = range(10)
SEG_LABEL = {CORE: 1, OED: 2, RIM: 4}

# relative means (flair, t1, t1ce, t2) before normalisation; section 11 table + confounders
CONTRAST = np.array(
    [
        [0.00, 0.00, 0.00, 0.00],  # background
        [0.15, 0.20, 0.20, 1.00],  # CSF
        [0.60, 0.60, 0.62, 0.70],  # grey matter
        [0.50, 0.80, 0.82, 0.50],  # white matter
        [0.85, 0.45, 0.47, 0.90],  # oedema (FLAIR 0.75-0.95 after jitter)
        [0.80, 0.50, 1.00, 0.75],  # enhancing rim
        [0.60, 0.25, 0.25, 0.95],  # necrotic core
        [0.92, 0.47, 0.49, 0.88],  # WM hyperintensity (oedema mimic in every channel, never enhancing)
        [0.45, 0.55, 1.00, 0.55],  # choroid plexus / vessel (enhancing mimic)
        [0.88, 0.50, 0.52, 0.85],  # periventricular cap/band (oedema mimic, never labelled)
    ],
    dtype=np.float32,
)
# per-case contrast jitter half-width per tissue (tumour compartments vary most)
JITTER = np.array([0.0, 0.05, 0.05, 0.05, 0.10, 0.10, 0.10, 0.10, 0.05, 0.10], dtype=np.float32)


def case_id(i: int) -> str:
    return f"BraTS2021_{i:05d}"


def case_files(root: Path, case: str) -> dict[str, Path]:
    """The five files of a BraTS case (modalities + seg)."""
    return {m: root / case / f"{case}_{m}.nii.gz" for m in (*MODALITIES, "seg")}


def pixel_mm(grid: Grid, image_size: int) -> float:
    """In-plane pixel size at image_size (the shorter side is scaled to S)."""
    return float(min(grid.fov[0], grid.fov[1])) / image_size


def core_radius_range(grid: Grid, image_size: int) -> tuple[float, float]:
    """Necrotic-core radius bounds (mm): [max(2 mm, 2 * FOV / S), 20 mm], drawn log-uniform."""
    return max(2.0, 2.0 * pixel_mm(grid, image_size)), R_CORE_MAX


# --------------------------------------------------------------------------- anatomy
def _anatomy(grid: Grid, rng: np.random.Generator) -> dict[str, Any]:
    """Brain ellipsoid with cortex, white matter, lateral ventricles and a midline CSF sliver."""
    x, y, z = grid.axes()
    fov = grid.fov
    semi = np.array([0.37, 0.45, 0.40]) * fov * rng.uniform(0.92, 1.08, 3)
    centre = rng.uniform(-3, 3, 3)
    xs, ys, zs = x - centre[0], y - centre[1], z - centre[2]
    rho = np.sqrt(ellipsoid_q(xs, ys, zs, (0, 0, 0), semi)) * (1 + 0.03 * smooth_field(rng, grid, 25.0))
    brain = rho < 1.0
    # distance to the surface along the ray from the centre
    r = np.sqrt(xs**2 + ys**2 + zs**2)
    depth = (1.0 - rho) / np.maximum(rho, 1e-3) * r
    gm_thick = rng.uniform(3.0, 4.0) * (1 + 0.4 * smooth_field(rng, grid, 15.0))
    tissue = np.zeros(grid.shape, dtype=np.uint8)
    tissue[brain] = WM
    tissue[brain & (depth < gm_thick)] = GM
    # lateral ventricles: banana-shaped ellipsoids either side of the midline
    vsize = rng.uniform(0.7, 1.4)
    vsemi = np.array([0.08 * semi[0], 0.32 * semi[1], 0.16 * semi[2]]) * vsize
    vsemi[0] = max(vsemi[0], 0.6 * grid.spacing[0])
    ventricles = np.zeros(grid.shape, dtype=bool)
    vcentres = []
    for side in (-1, 1):
        c = np.array([side * 0.13 * semi[0], 0.05 * semi[1], 0.12 * semi[2]]) + centre
        bend = 0.25 * semi[2] * ((y - c[1]) / vsemi[1]) ** 2
        ventricles |= ellipsoid_q(x, y, z + bend, c, vsemi) < 1.0
        vcentres.append(c)
    tissue[ventricles & brain] = CSF
    # periventricular FLAIR caps at the horns (in 60% of cases): oedema-like, not tumour
    if rng.uniform() < 0.8:
        band = rng.uniform(3.0, 8.0)
        caps = np.zeros(grid.shape, dtype=bool)
        for side in (-1, 1):
            c = np.array([side * 0.13 * semi[0], 0.05 * semi[1], 0.12 * semi[2]]) + centre
            bend = 0.25 * semi[2] * ((y - c[1]) / vsemi[1]) ** 2
            grown = ellipsoid_q(x, y, z + bend, c, vsemi + band) < 1.0
            caps |= grown & (np.abs(y - c[1]) > 0.45 * vsemi[1])
        tissue[caps & brain & ~ventricles] = PVH
    # choroid plexus: an enhancing blob inside each ventricle (t1ce mimic of the rim)
    for c in vcentres:
        cp = c + np.array([0.0, -0.5 * vsemi[1], 0.0])
        cps = np.maximum(vsemi * np.array([0.6, 0.2, 0.5]), 0.6 * np.asarray(grid.spacing))
        tissue[(ellipsoid_q(x, y, z, cp, cps) < 1.0) & brain] = ENH
    # midline CSF sliver (interhemispheric fissure) as a partial-volume fraction
    width = rng.uniform(1.5, 3.0)
    sliver = np.clip((width / 2 - np.abs(xs)) / grid.spacing[0] + 0.5, 0, 1).astype(np.float32)
    sliver = sliver * ((zs > -0.2 * semi[2]) & (np.abs(ys) < 0.85 * semi[1]) & ~ventricles)
    return {
        "brain": brain,
        "rho": rho,
        "tissue": tissue,
        "ventricles": ventricles,
        "semi": semi,
        "centre": centre,
        "sliver": sliver * brain,
    }


def _vessels(grid: Grid, anat: dict, rng: np.random.Generator) -> np.ndarray:
    """A few thin tubular enhancing vessels (t1ce as bright as the rim)."""
    x, y, z = grid.axes()
    semi, centre = anat["semi"], anat["centre"]
    radius = max(0.8, 0.55 * min(grid.spacing))
    mask = np.zeros(grid.shape, dtype=bool)
    for _ in range(rng.integers(2, 5)):
        # a gently curved vessel running mostly superior-inferior or anterior-posterior
        ax = rng.integers(1, 3)
        t = np.linspace(-0.8, 0.8, 5)
        start = rng.uniform(-0.6, 0.6, 3)
        pts = np.tile(start, (5, 1))
        pts[:, ax] = t
        pts[:, [a for a in range(3) if a != ax]] += np.cumsum(rng.normal(0, 0.08, (5, 2)), axis=0)
        pts = pts * semi + centre
        mask |= tube(x, y, z, pts, np.full(5, radius))
    return mask & anat["brain"]


# --------------------------------------------------------------------------- tumour
def _sample_lesion(anat: dict, rng: np.random.Generator, r_lo: float, shrink: float) -> dict:
    """One lesion; ``shrink`` in [0, 1) narrows the draws towards small, polar lesions."""
    semi, centre = anat["semi"], anat["centre"]
    r_hi = max(r_lo, R_CORE_MAX - (R_CORE_MAX - r_lo) * shrink) + 1e-6
    r_c = log_uniform(rng, r_lo, r_hi)
    z_off = 0.15 + 0.45 * shrink
    pos = np.array([0.0, -0.3, min(z_off, 0.6)]) * semi + centre  # used if no draw below fits
    for _ in range(100):  # a centre in white matter, away from the ventricles
        u = rng.uniform(-1, 1, 3)
        u[2] = np.sign(u[2] or 1.0) * max(abs(u[2]), z_off)  # off the equator: leaves clean slices
        if np.linalg.norm(u) > 0.65:
            continue
        pos = u * semi + centre
        vc = np.array([0.0, 0.05 * semi[1], 0.12 * semi[2]]) + centre
        if np.linalg.norm((pos - vc) / (semi * np.array([0.3, 0.45, 0.3]))) > 1.0:
            break
    return {
        "centre": pos,
        "r_core": r_c,
        "rim": rng.uniform(2.0, 4.0),
        "r_oedema": r_c * rng.uniform(1.5, 2.5 - shrink),
        "has_core": bool(rng.uniform() >= 0.2),
        # infiltrative oedema: its signal fades towards the outer label boundary, and a faint
        # unlabelled halo continues outside it (the annotated edge is not an intensity edge)
        "fade": rng.uniform(0.3, 0.7),
        "edge_signal": rng.uniform(0.6, 0.9),
        "halo": rng.uniform(0.0, 0.1),
        "halo_mm": rng.uniform(2.0, 5.0),
    }


def _tumour_labels(grid: Grid, anat: dict, lesions: list[dict], fields: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Seg labels (uint8) of the lesions, irregular boundaries from thresholded random fields,
    and the oedema signal strength (0..1: fading outwards, a faint halo outside the label)."""
    x, y, z = grid.axes()
    f_in, f_out = fields
    seg = np.zeros(grid.shape, dtype=np.uint8)
    dists = []
    for les in lesions:
        c = les["centre"]
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        dists.append((d * (1 + 0.15 * f_in), d * (1 + 0.3 * f_out), les))
    signal = np.zeros(grid.shape, dtype=np.float32)
    for _, d_out, les in dists:
        r_out = max(les["r_oedema"], les["r_core"] + les["rim"] + 2.0)
        seg[d_out < r_out] = 2
        depth = (r_out - d_out) / (les["fade"] * (r_out - les["r_core"] - les["rim"]))
        inside = les["edge_signal"] + (1 - les["edge_signal"]) * np.clip(depth, 0, 1)
        outside = les["halo"] * np.exp(-np.maximum(d_out - r_out, 0) / les["halo_mm"])
        signal = np.maximum(signal, np.where(d_out < r_out, inside, outside).astype(np.float32))

    for d_in, _, les in dists:
        seg[d_in < les["r_core"] + les["rim"]] = 4
    for d_in, _, les in dists:
        if les["has_core"]:
            seg[d_in < les["r_core"]] = 1
    seg[~anat["brain"]] = 0
    return _drop_fragments(seg), signal


def _drop_fragments(seg: np.ndarray) -> np.ndarray:
    """Remove detached specks of the thresholded boundary (< 20% of the largest component)."""
    from scipy.ndimage import label

    comp, n = label(seg > 0)
    if n > 1:
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        seg[(sizes < 0.2 * sizes.max())[comp]] = 0
    return seg


def _place_tumours(grid: Grid, anat: dict, rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample lesions until the case yields positive, clean negative and ambiguous slices.

    Deterministic (own RNG stream); the first placement meeting every requirement wins, else the
    first with positive and >= 2 negative slices, else the last tried.  After four plain draws the
    draws narrow towards smaller lesions nearer a pole (needed where the brain is short in z,
    e.g. the smoke profile: 80 mm of brain against a whole tumour of up to 100 mm).
    """
    r_lo = core_radius_range(grid, image_size)[0]
    fields = (smooth_field(rng, grid, max(8.0, 2 * grid.spacing[0])), smooth_field(rng, grid, 12.0))
    fallback = None
    for attempt in range(MAX_ATTEMPTS):
        n = 2 if rng.uniform() < 0.15 else 1
        shrink = 0.0 if attempt < 4 else attempt / MAX_ATTEMPTS  # first 4 tries: protocol draws
        lesions = [_sample_lesion(anat, rng, r_lo, shrink) for _ in range(n)]
        seg, signal = _tumour_labels(grid, anat, lesions, fields)
        stats = slice_stats(seg > 0, anat["brain"], image_size)
        if stats_ok(stats, need_amb=True, min_neg=2):
            return seg, signal
        if fallback is None and stats_ok(stats, need_amb=False, min_neg=2):
            fallback = (seg, signal)
    return fallback if fallback is not None else (seg, signal)


def _mimics(grid: Grid, anat: dict, seg: np.ndarray, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """White-matter hyperintensities outside the tumour, anywhere in z (oedema-like, no label).

    Every case gets 0-6 small foci (section 11); 40% of cases also carry a confluent burden
    (Fazekas 2-3, common in the age group of glioma patients): 6-16 further foci up to twice
    the size, clustered around the ventricles.
    """
    x, y, z = grid.axes()
    pix = pixel_mm(grid, image_size)
    lo, hi = max(1.0, 0.5 * pix), max(3.0, 2.0 * pix)
    mask = np.zeros(grid.shape, dtype=bool)
    wm = anat["tissue"] == WM
    foci = [(1.0, lo, hi)] * int(rng.integers(0, 7))
    if rng.uniform() < 0.4:
        foci += [(0.55, lo, 2 * hi)] * int(rng.integers(6, 17))
    for spread, r_lo, r_hi in foci:
        for _ in range(50):
            u = rng.uniform(-1, 1, 3) * np.array([0.7, 0.7, 0.85]) * spread
            pos = u * anat["semi"] + anat["centre"]
            idx = tuple(
                int(np.clip(round(p / s + (n - 1) / 2), 0, n - 1)) for p, s, n in zip(pos, grid.spacing, grid.shape)
            )
            if wm[idx] and seg[idx] == 0:
                break
        r = log_uniform(rng, r_lo, r_hi)
        semi = r * rng.uniform(0.6, 1.4, 3)
        mask |= ellipsoid_q(x, y, z, pos, semi) < 1.0
    return mask & wm & (seg == 0)


# --------------------------------------------------------------------------- intensities
def _bias(grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """exp(p(x, y, z)), p a 2nd-order polynomial, coefficients U(-0.3, 0.3), coords in [-1, 1]."""
    x, y, z = grid.axes()
    half = grid.fov / 2
    u, v, w = x / half[0], y / half[1], z / half[2]
    terms = [u, v, w, u * u, v * v, w * w, u * v, u * w, v * w]
    p = sum(c * t for c, t in zip(rng.uniform(-0.3, 0.3, len(terms)), terms))
    return np.exp(p).astype(np.float32)


def _render(grid: Grid, tissue: np.ndarray, anat: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from scipy.ndimage import gaussian_filter

    brain = anat["brain"]
    tumour = (tissue == OED) | (tissue == RIM) | (tissue == CORE)
    lut = CONTRAST + JITTER[:, None] * rng.uniform(-1, 1, CONTRAST.shape).astype(np.float32)
    lut[ENH, 2] = lut[RIM, 2]  # enhancing mimics exactly as bright as the rim in t1ce
    wm = tissue == WM
    het = smooth_field(rng, grid, max(6.0, 1.5 * grid.spacing[0]))  # tumour heterogeneity
    out = {}
    sig = anat["oedema_signal"]
    oed = tissue == OED
    normal = (tissue == WM) | (tissue == GM)
    for m, name in enumerate(MODALITIES):
        img = lut[tissue, m]
        img = np.where(oed, lut[WM, m] + sig * (lut[OED, m] - lut[WM, m]), img)
        img = np.where(normal, img + sig * (lut[OED, m] - img), img)  # halo / unlabelled specks
        img = img * (1 - anat["sliver"]) + lut[CSF, m] * anat["sliver"]
        img = img * (1 + 0.03 * voxel_noise(rng, grid.shape, 1.0))
        img = np.where(tumour, img * (1 + 0.15 * het), img)
        img = np.clip(img, 1e-3, None) ** rng.uniform(0.8, 1.25) * rng.uniform(0.8, 1.2)
        img = img * _bias(grid, rng)
        img = gaussian_filter(np.where(brain, img, 0).astype(np.float32), 0.5)  # partial volume
        sigma = rng.uniform(0.02, 0.04) * float(np.median(img[wm])) if wm.any() else 0.01
        n1 = rng.normal(0, sigma, grid.shape).astype(np.float32)
        n2 = rng.normal(0, sigma, grid.shape).astype(np.float32)
        img = np.sqrt((img + n1) ** 2 + n2**2)  # Rician
        out[name] = np.where(brain, img, 0).astype(np.float32)
    return out


# --------------------------------------------------------------------------- public
def brain_case(profile: Any, seed: int, i: int) -> tuple[dict[str, np.ndarray], np.ndarray, Grid]:
    """Case ``i``: ({modality: (X, Y, Z) float32}, seg (X, Y, Z) uint8, grid), all RAS order."""
    grid = grid_from(profile.brain_phantom)
    ss = np.random.SeedSequence(derive_seed(seed, "brats", f"phantom/brain/{i}"))
    r_anat, r_tum, r_mim, r_img = (np.random.default_rng(s) for s in ss.spawn(4))
    anat = _anatomy(grid, r_anat)
    tissue = anat["tissue"]
    tissue[_vessels(grid, anat, r_anat) & (tissue != CSF)] = ENH
    seg, anat["oedema_signal"] = _place_tumours(grid, anat, r_tum, int(profile.image_size))
    tissue[_mimics(grid, anat, seg, r_mim, int(profile.image_size))] = WMH
    for tid, lab in SEG_LABEL.items():
        tissue[seg == lab] = tid
    return _render(grid, tissue, anat, r_img), seg, grid


def write_brain_phantom(out: Path, profile: Any, seed: int, n_cases: int | None = None) -> list[str]:
    """Write the profile's brain phantom into ``out`` (BraTS layout); returns the case ids."""
    out = Path(out)
    n = int(profile.brain_phantom.cases if n_cases is None else n_cases)
    ids = []
    for i in range(n):
        images, seg, grid = brain_case(profile, seed, i)
        cid = case_id(i)
        files = case_files(out, cid)
        aff = grid.affine(lps=True)
        for m in MODALITIES:
            write_nifti(files[m], images[m], aff, lps=True)
        write_nifti(files["seg"], seg, aff, lps=True)
        ids.append(cid)
    return ids
