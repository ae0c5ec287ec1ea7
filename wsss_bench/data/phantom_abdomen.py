"""Synthetic FLARE21-like abdominal CT phantom (docs/protocol.md section 11, "Abdomen").

Writes the official layout ``<out>/TrainingImg/train_{i:03d}_0000.nii.gz`` (int16 HU) +
``<out>/TrainingMask/train_{i:03d}.nii.gz`` (uint8: 1 liver, 2 kidneys, 3 spleen, 4 pancreas),
or the nnU-Net layout ``imagesTr/`` + ``labelsTr/`` with ``layout="nnunet"``.  Even cases get a
RAS affine, odd cases an LPS-style one.  Case i is a pure function of (GENERATOR_VERSION, seed, i)
through ``derive_seed(seed, "flare21", f"phantom/abdomen/{i}")``.

Anatomy is laid out for a 409.6 x 409.6 x 240 mm field of view (the FOV of every profile) and
scaled with the profile's FOV.  Coordinates are RAS: +x patient right, +y anterior, +z superior.
Difficulty confounders: per-case organ HU jitter (+-15 HU), a random contrast phase that changes
kidney cortex/medulla contrast and vessel enhancement, enhancing vessels (aorta, IVC, portal vein),
intrahepatic vessels and cysts inside the liver label, paraspinal muscles next to the kidneys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsss_bench.data.phantom_common import (
    Grid,
    ellipsoid_q,
    grid_from,
    slice_stats,
    smooth_field,
    stats_ok,
    tube,
    voxel_noise,
    write_nifti,
)
from wsss_bench.seeding import derive_seed

GENERATOR_VERSION = "abdomen-2"
LAYOUTS = {"official": ("TrainingImg", "TrainingMask"), "nnunet": ("imagesTr", "labelsTr")}
CANONICAL_FOV = np.array([409.6, 409.6, 240.0])
MAX_ATTEMPTS = 10
ORGAN_LABELS = {"liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4}

# tissue ids of the internal tissue map and their base HU
(AIR, SC_FAT, MUSCLE, V_FAT, CORTEX_BONE, CANC_BONE, CANAL, LIVER, SPLEEN, K_CORTEX, K_MEDULLA,
 K_PELVIS, PANCREAS, GAS, BOWEL_WALL, AORTA, IVC, PORTAL, CYST) = range(19)
BASE_HU = np.array(
    [-1000, -100, 50, -90, 700, 250, 20, 100, 110, 180, 120, 10, 90, -950, 40, 180, 160, 160, 10],
    dtype=np.float32,
)
TEXTURE_HU = np.zeros(len(BASE_HU), dtype=np.float32)
TEXTURE_HU[[LIVER, SPLEEN, K_CORTEX, K_MEDULLA, PANCREAS, MUSCLE]] = [8, 6, 8, 8, 12, 6]


def case_id(i: int) -> str:
    return f"train_{i:03d}"


def case_paths(root: Path, case: str, layout: str = "official") -> tuple[Path, Path]:
    img_dir, lab_dir = LAYOUTS[layout]
    return root / img_dir / f"{case}_0000.nii.gz", root / lab_dir / f"{case}.nii.gz"


# --------------------------------------------------------------------------- geometry
def _draw_params(rng: np.random.Generator) -> dict[str, Any]:
    """Per-case anatomy in canonical mm (before FOV scaling)."""
    body = np.array([164.0, 123.0]) * rng.uniform(0.92, 1.05, 2)
    fat = rng.uniform(10, 20)
    ys = -body[1] + fat + rng.uniform(45, 55)  # vertebral body centre
    scale = {k: rng.uniform(0.8, 1.2) for k in ("liver", "spleen", "kidney_l", "kidney_r", "pancreas")}
    jit = rng.uniform(-5, 5, 3)
    return {
        "body": body,
        "fat": fat,
        "wall": rng.uniform(7, 12),
        "spine": (ys, rng.uniform(17, 22)),
        "scale": scale,
        "liver": (np.array([58, 5, 40]) + jit, np.array([75, 80, 70])),
        "liver_left": (np.array([-25, 45, 55]) + jit, np.array([50, 32, 38])),
        "spleen": (np.array([-95, -40, 50]) + rng.uniform(-6, 6, 3), np.array([30, 52, 50])),
        "kidney_l": (np.array([-65, ys + 8, 0]) + rng.uniform(-5, 5, 3), np.array([26, 29, 55])),
        "kidney_r_drop": rng.uniform(10, 20),
        "kidney_r": (np.array([65, ys + 8, 0]) + rng.uniform(-5, 5, 3), np.array([26, 29, 55])),
        "pancreas_z": rng.uniform(20, 35),
        "gas": [
            (np.array([rng.uniform(-110, 110), rng.uniform(5, 80), rng.uniform(-110, -10)]), rng.uniform(8, 20, 3))
            for _ in range(rng.integers(3, 9))
        ],
        "cysts": [
            (np.array([58, 5, 40]) + rng.uniform(-40, 40, 3), rng.uniform(4, 12))
            for _ in range(rng.integers(0, 3))
        ],
        "aorta_r": rng.uniform(9, 12),
    }


def _labels(grid: Grid, prm: dict, warp: tuple, dz: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Organ label map (uint8) and organ masks; organs warped by a smooth displacement."""
    x, y, z = grid.axes()
    k = grid.fov / CANONICAL_FOV  # canonical mm -> this FOV
    # warped canonical coordinates
    xw = (x + warp[0]) / k[0]
    yw = (y + warp[1]) / k[1]
    zw = (z + warp[2]) / k[2] - dz
    sc = prm["scale"]
    organs = {}
    c, s = prm["liver"]
    c2, s2 = prm["liver_left"]
    organs["liver"] = (ellipsoid_q(xw, yw, zw, c, s * sc["liver"]) < 1) | (
        ellipsoid_q(xw, yw, zw, c2, s2 * sc["liver"]) < 1
    )
    c, s = prm["spleen"]
    organs["spleen"] = ellipsoid_q(xw, yw, zw, c, s * sc["spleen"]) < 1
    kq = {}
    for side in ("kidney_l", "kidney_r"):
        c, s = prm[side]
        c = c - np.array([0, 0, prm["kidney_r_drop"] if side == "kidney_r" else 0])
        kq[side] = ellipsoid_q(xw, yw, zw, c, s * sc[side])
    organs["kidney"] = (kq["kidney_l"] < 1) | (kq["kidney_r"] < 1)
    pz, ps = prm["pancreas_z"], sc["pancreas"]
    ys = prm["spine"][0]
    pts = [(-75, -25, pz + 12), (-35, ys + 55, pz + 5), (0, ys + 62, pz), (30, ys + 55, pz - 8)]
    organs["pancreas"] = tube(xw, yw, zw, pts, np.array([8, 10, 11, 15]) * ps)
    lab = np.zeros(grid.shape, dtype=np.uint8)
    for name in ("liver", "pancreas", "spleen", "kidney"):  # later wins where organs touch
        lab[organs[name]] = ORGAN_LABELS[name]
    organs["kq"] = kq
    organs["coords"] = (xw, yw, zw)
    return lab, organs


def _tissues(grid: Grid, prm: dict, lab: np.ndarray, organs: dict, rng: np.random.Generator) -> np.ndarray:
    """Tissue map: body wall, spine, vessels, bowel gas, organs with internal structure."""
    x, y, z = grid.axes()
    k = grid.fov / CANONICAL_FOV
    xc, yc, zc = x / k[0], y / k[1], z / k[2]  # unwarped canonical coordinates
    a, b = prm["body"]
    rho = np.sqrt((xc / a) ** 2 + (yc / b) ** 2) * np.ones_like(zc)
    depth = (1 - rho) / np.maximum(rho, 1e-3) * np.sqrt(xc**2 + yc**2)
    t = np.full(grid.shape, AIR, dtype=np.uint8)
    t[rho < 1] = SC_FAT
    t[(rho < 1) & (depth > prm["fat"])] = MUSCLE
    t[(rho < 1) & (depth > prm["fat"] + prm["wall"])] = V_FAT
    ys, rs = prm["spine"]
    for side in (-1, 1):  # paraspinal muscles
        t[ellipsoid_q(xc, yc, zc * 0, (side * 38, ys - 22, 0), (24, 20, 1)) < 1] = MUSCLE
    # bowel gas pockets with walls, anterior, lower half
    for c, semi in prm["gas"]:
        q = ellipsoid_q(xc, yc, zc, c, semi)
        t[(q < (1 + 3.0 / semi.min()) ** 2) & (t == V_FAT)] = BOWEL_WALL
        t[q < 1] = GAS
    # vessels: aorta (left-anterior of the spine), IVC (right), portal vein (to the liver hilum)
    pz = prm["pancreas_z"]
    aorta = [(-15, ys + rs + 12, -130), (-14, ys + rs + 14, 0), (-12, ys + rs + 12, 130)]
    t[tube(xc, yc, zc, aorta, np.full(3, prm["aorta_r"]))] = AORTA
    ivc = [(22, ys + rs + 8, -130), (24, ys + rs + 10, 40), (30, ys + rs + 14, 130)]
    t[tube(xc, yc, zc, ivc, np.full(3, 10.0))] = IVC
    portal = [(5, ys + 50, pz - 5), (30, ys + 75, pz + 20), (55, 15, pz + 45)]
    portal_mask = tube(xc, yc, zc, portal, np.array([7.0, 7.0, 5.0]))
    t[portal_mask] = PORTAL
    # organs (labels decide membership), then their inner structure
    for name, tid in (("liver", LIVER), ("pancreas", PANCREAS), ("spleen", SPLEEN)):
        t[lab == ORGAN_LABELS[name]] = tid
    kid = lab == 2
    t[kid] = K_CORTEX
    xw, yw, zw = organs["coords"]
    for side in ("kidney_l", "kidney_r"):
        inner = organs["kq"][side] < 0.45
        t[kid & inner] = K_MEDULLA
        c, s = prm[side]
        sign = 1 if side == "kidney_l" else -1  # hilum faces the spine
        hil = c + np.array([sign * 0.45 * s[0], 0, -(prm["kidney_r_drop"] if side == "kidney_r" else 0)])
        t[kid & (ellipsoid_q(xw, yw, zw, hil, (10, 9, 16)) < 1)] = K_PELVIS
    liver = lab == 1
    t[liver & portal_mask] = PORTAL  # intrahepatic portal branch keeps the liver label
    hep = [(55, 15, pz + 45), (70, 20, pz + 70), (90, 10, pz + 85)]
    t[liver & tube(xw, yw, zw, hep, np.array([5.0, 4.0, 3.0]))] = PORTAL
    for c, r in prm["cysts"]:
        t[liver & (ellipsoid_q(xw, yw, zw, c, (r, r, r)) < 1)] = CYST
    # spine last: cortex shell, cancellous core, canal
    sq = ellipsoid_q(xc, yc, zc * 0, (0, ys, 0), (rs, rs * 0.85, 1))
    t[sq < 1] = CORTEX_BONE
    t[sq < (1 - 3.0 / rs) ** 2] = CANC_BONE
    t[ellipsoid_q(xc, yc, zc * 0, (0, ys - rs - 10, 0), (8, 8, 1)) < 1] = CANAL
    return t


def _hu(grid: Grid, tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """HU volume: per-case organ jitter, contrast phase, texture, one-voxel blur, 12 HU noise."""
    from scipy.ndimage import gaussian_filter

    lut = BASE_HU.copy()
    lut[[LIVER, SPLEEN, PANCREAS]] += rng.uniform(-15, 15, 3)
    phase = rng.uniform()  # 0 arterial -> 1 delayed
    lut[K_CORTEX] = 180 - 25 * phase + rng.uniform(-15, 15)
    lut[K_MEDULLA] = 110 + 50 * phase + rng.uniform(-15, 15)
    lut[AORTA] = 200 - 50 * phase * rng.uniform(0.5, 1)
    lut[[IVC, PORTAL]] = 150 + 40 * phase * rng.uniform(0.5, 1, 2)
    lut[LIVER] += 10 * phase  # the liver enhances late
    hu = lut[tissue] + TEXTURE_HU[tissue] * voxel_noise(rng, grid.shape, 1.5)
    hu = hu + 6 * smooth_field(rng, grid, 30.0) * (TEXTURE_HU[tissue] > 0)  # slow intra-organ drift
    hu = gaussian_filter(hu.astype(np.float32), 0.6)
    hu = hu + rng.normal(0, 12, grid.shape).astype(np.float32)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


# --------------------------------------------------------------------------- public
def abdomen_case(profile: Any, seed: int, i: int) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Case ``i``: (HU (X, Y, Z) int16, labels (X, Y, Z) uint8, grid), RAS order.

    The anatomy's z position is re-drawn (deterministically) until every organ has positive,
    negative and ambiguous slices at the profile's image size, or MAX_ATTEMPTS is reached.
    """
    grid = grid_from(profile.abdomen_phantom)
    ss = np.random.SeedSequence(derive_seed(seed, "flare21", f"phantom/abdomen/{i}"))
    r_anat, r_warp, r_img = (np.random.default_rng(s) for s in ss.spawn(3))
    prm = _draw_params(r_anat)
    amp = 8.0
    warp = tuple(amp * smooth_field(r_warp, grid, 60.0) for _ in range(3))
    size = int(profile.image_size)
    x, y, _ = grid.axes()
    k = grid.fov / CANONICAL_FOV
    a, b = prm["body"]
    body = np.broadcast_to(((x / k[0] / a) ** 2 + (y / k[1] / b) ** 2) < 1, grid.shape)
    organ_keys = {1: ("liver",), 2: ("kidney_l", "kidney_r"), 3: ("spleen",)}
    best = None
    for attempt in range(MAX_ATTEMPTS):
        dz = 0.0 if attempt == 0 else r_anat.uniform(-1, 1) * max(grid.spacing[2], 10.0)
        lab, organs = _labels(grid, prm, warp, dz)
        stats = {v: slice_stats(lab == v, body, size) for v in organ_keys}
        score = sum(stats_ok(s, need_amb=True) for s in stats.values())
        score += 3 * all(stats_ok(s, need_amb=False) for s in stats.values())
        if best is None or score > best[0]:
            best = (score, lab, organs)
        if score == 6:
            break
        for v, s in stats.items():  # too few positive slices: grow the organ, within U(0.8, 1.2)
            if s["pos"] < 3:
                for key in organ_keys[v]:
                    prm["scale"][key] = min(1.2, prm["scale"][key] * 1.1)
    _, lab, organs = best
    tissue = _tissues(grid, prm, lab, organs, r_img)
    return _hu(grid, tissue, r_img), lab, grid


def write_abdomen_phantom(
    out: Path, profile: Any, seed: int, n_cases: int | None = None, layout: str = "official"
) -> list[str]:
    """Write the profile's abdomen phantom into ``out`` in the official or nnU-Net layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    out = Path(out)
    n = int(profile.abdomen_phantom.cases if n_cases is None else n_cases)
    ids = []
    for i in range(n):
        hu, lab, grid = abdomen_case(profile, seed, i)
        cid = case_id(i)
        img_path, lab_path = case_paths(out, cid, layout)
        lps = i % 2 == 1
        aff = grid.affine(lps=lps)
        write_nifti(img_path, hu, aff, lps=lps)
        write_nifti(lab_path, lab, aff, lps=lps)
        ids.append(cid)
    return ids
