"""Fuzzing the two parsers a user's input meets first (issue 14): spec strings and NIfTI files.

- :func:`~wsss_bench.spec.parse_specs` / :func:`~wsss_bench.spec.parse_sources` on random
  text either parse or raise :class:`UserError` (with its position pointer), never anything
  else; every cell a parse yields is written back by ``format_spec`` to text that parses to
  the same cell, and generated valid specs round-trip.
- The readers (:class:`BratsDataset`, :class:`Flare21Dataset`) on files made of random bytes,
  on random headers (shapes of 0-5 dimensions, every NIfTI dtype, broken affines and scaling),
  and on valid files cut short or with flipped bytes, either load or raise UserError naming
  the file; the loaded values are finite and in [0, 1].
"""
from __future__ import annotations

import gzip
import re
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from wsss_bench.data.readers import BratsDataset, Flare21Dataset
from wsss_bench.errors import UserError
from wsss_bench.spec import format_spec, parse_scalar, parse_sources, parse_specs

FUZZ = settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
GRAMMAR = "ab_[]=,+'\" 0.1-9xe\t"


# ============================================================================ spec strings
def _parse_or_user_error(fn, text):
    try:
        return fn(text)
    except UserError as err:
        msg = str(err)
        assert msg
        if msg.startswith("malformed spec"):  # the text and a pointer under the offending character
            pos = int(re.search(r"at position (\d+)", msg).group(1))
            assert 0 <= pos <= len(text) and msg.endswith(f"{text}\n{' ' * pos}^"), msg
            assert "Expected NAME or NAME[key=value,key2=[a,b]]" in msg
        return None


def _same(a: dict, b: dict) -> bool:
    """Equal parameter dicts, NaN equal to NaN, and 1 (int) not equal to 1.0 (float)."""
    def norm(v):
        return ("nan",) if isinstance(v, float) and v != v else (type(v).__name__, v)
    return a.keys() == b.keys() and all(norm(a[k]) == norm(b[k]) for k in a)


def _reparses_to_same_cells(specs):
    for spec in specs:
        for params in spec.expand():
            text = format_spec(spec.name, params)
            (again,) = parse_specs(text)
            assert again.name == spec.name
            (back,) = again.expand()
            assert _same(back, params), (text, params, back)


@FUZZ
@given(st.one_of(st.text(alphabet=GRAMMAR, max_size=40), st.text(max_size=30)))
def test_spec_parser_only_raises_user_error(text):
    specs = _parse_or_user_error(parse_specs, text)
    if specs is not None:
        _reparses_to_same_cells(specs)
    combos = _parse_or_user_error(parse_sources, text)
    if combos is not None:
        _reparses_to_same_cells([s for combo in combos for s in combo])


NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,8}", fullmatch=True)
STRINGS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8).filter(
    lambda s: not ("'" in s and '"' in s))  # no spec syntax quotes a string holding both quote characters
SCALARS = st.one_of(st.integers(-10**12, 10**12), st.booleans(), st.none(), STRINGS,
                    st.floats(allow_nan=False, width=64))


@FUZZ
@given(NAMES, st.dictionaries(NAMES, SCALARS, max_size=5))
def test_valid_specs_round_trip(name, params):
    text = format_spec(name, params)
    (spec,) = parse_specs(text)
    assert spec.name == name and _same(spec.expand()[0], params), text
    (combo,) = parse_sources(text)
    assert len(combo) == 1 and _same(combo[0].expand()[0], params)
    # a combination of two sources and a grid axis come back too
    if params:
        key = sorted(params)[0]
        (combo,) = parse_sources(f"{text}+other")
        assert [s.name for s in combo] == [name, "other"]
        grid = parse_specs(f"{name}[{key}=[1,2]]")[0].expand()
        assert grid == [{key: 1}, {key: 2}]


def test_round_trip_counterexamples_found_by_fuzzing():
    """Values hypothesis found that once broke the round trip or the parser's contract."""
    for value in ["a'b\"c", "x'y", "\x1c", " pad ", "1", "nan", "", "a+b"]:
        try:
            specs = parse_specs(f"p[k={value}]")
        except UserError:
            continue
        _reparses_to_same_cells(specs)
    assert parse_scalar("1e-05") == 1e-05


# ============================================================================ NIfTI files
#: the dtypes nibabel writes into a NIfTI-1 file (it refuses bool, float16 and 64-bit integers)
DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.float32, np.float64,
          np.complex64, np.complex128]
RGB = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])  # NIfTI RGB24


CASE_SHAPE = (6, 6, 4)


def _brats_case(root: Path, shape=CASE_SHAPE, seed=0) -> dict[str, Path]:
    """A valid 1-case BraTS folder; returns modality -> path."""
    rng = np.random.default_rng(seed)
    case = root / "BraTS2021_00000"
    case.mkdir(parents=True, exist_ok=True)
    paths = {}
    for m in ("flair", "t1", "t1ce", "t2"):
        paths[m] = case / f"{case.name}_{m}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), np.eye(4)), str(paths[m]))
    seg = np.zeros(shape, np.uint8)
    seg[1:3, 1:3, 1:3] = 2
    paths["seg"] = case / f"{case.name}_seg.nii.gz"
    nib.save(nib.Nifti1Image(seg, np.eye(4)), str(paths["seg"]))
    return paths


def _flare_case(root: Path, shape=CASE_SHAPE) -> dict[str, Path]:
    (root / "TrainingImg").mkdir(parents=True, exist_ok=True)
    (root / "TrainingMask").mkdir(parents=True, exist_ok=True)
    img, lab = root / "TrainingImg" / "train_000_0000.nii.gz", root / "TrainingMask" / "train_000.nii.gz"
    nib.save(nib.Nifti1Image(np.full(shape, 40.0, np.float32), np.eye(4)), str(img))
    labels = np.zeros(shape, np.uint8)
    labels[2:4, 2:4, 1:3] = 2
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(lab))
    return {"image": img, "label": lab}


def _load_everything(reader, root: Path, case: str) -> None:
    """geometry + load_case; UserError is the only failure allowed, and what loads is sane."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel/numpy may warn about odd headers; errors are what count
        try:
            cases = reader.cases(root)
            assert cases == [case]
            channels, shape = reader.geometry(root, case)
            image, labels, _notes = reader.load_case(root, case)
        except UserError as err:
            assert str(err) and "Traceback" not in str(err)
            event("UserError: " + re.sub(r"\S*/\S*", "<file>", str(err))[:50])
            return
    event("loaded")
    assert image.shape == (channels, *shape) and labels.shape == tuple(shape)
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _fresh(base: Path, name: str) -> Path:
    root = base / name
    if root.exists():
        shutil.rmtree(root)
    return root


@FUZZ
@given(st.sampled_from(["flair", "t2", "seg"]), st.binary(max_size=600), st.booleans())
def test_random_bytes_in_place_of_a_volume(fuzz_root, which, blob, gz):
    root = _fresh(fuzz_root, "bytes")
    paths = _brats_case(root)
    paths[which].write_bytes(gzip.compress(blob) if gz else blob)
    _load_everything(BratsDataset(), root, "BraTS2021_00000")


@st.composite
def nifti_images(draw, wild: bool = True):
    """(data, affine, scl_slope, damage); ``wild=False``: the case's shape, an identity affine
    and no damage, so every example reaches the voxel checks (dtype, values, labels)."""
    if not wild or draw(st.booleans()):
        shape = CASE_SHAPE  # the other files' shape: loading gets as far as the voxels
    else:
        ndim = draw(st.integers(0, 5))
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES + [RGB, np.complex64, np.uint8, np.float32]))  # oversampled
    n = int(np.prod(shape)) if shape else 1
    element = draw(st.sampled_from([
        st.sampled_from([0, 1, 2, 4]),  # valid labels (and plain intensities)
        st.integers(-300, 300),
        st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-300, 300)),
    ]))
    values = draw(st.lists(element, min_size=n, max_size=n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat = np.array(values, dtype=np.float64)
        if dtype is RGB:
            data = np.zeros(n, dtype=RGB)
            for channel in ("R", "G", "B"):
                data[channel] = np.nan_to_num(flat).astype(np.uint8)
            data = data.reshape(shape)
        else:
            data = flat.astype(dtype).reshape(shape)
    affine = np.eye(4)
    if not wild:
        return data, affine, draw(st.sampled_from([None, 1.0, 2.5, np.nan])), 0
    kind = draw(st.sampled_from(["eye", "eye", "eye", "flip", "singular", "nan", "random"]))
    if kind == "flip":
        affine = np.diag([-1.0, 1.0, -2.0, 1.0])
    elif kind == "singular":
        affine[0, 0] = 0.0
    elif kind == "nan":
        affine[1, 1] = np.nan
    elif kind == "random":
        affine[:3, :3] = np.array(draw(st.lists(st.floats(-3, 3), min_size=9, max_size=9))).reshape(3, 3)
    slope = draw(st.sampled_from([None, None, None, 0.0, 1.0, 2.5, np.nan, np.inf, -1.0]))
    return data, affine, slope, draw(st.sampled_from([0, 0, 0, 1, 2, 3]))


def _save(img_spec, path: Path) -> bool:
    data, affine, slope, damage = img_spec
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.Nifti1Image(data, affine)
            if slope is not None:
                img.header.set_slope_inter(slope, 0.0)
            nib.save(img, str(path))
    except Exception:  # nibabel refuses to write it: nothing for the reader to meet
        return False
    raw = path.read_bytes()
    if damage == 1:  # cut short
        path.write_bytes(raw[: max(1, len(raw) // 2)])
    elif damage == 2:  # one flipped byte inside the gzip stream
        b = bytearray(raw)
        b[len(b) // 2] ^= 0xFF
        path.write_bytes(bytes(b))
    elif damage == 3:  # the same bytes, not gzipped, under the .nii.gz name
        path.write_bytes(gzip.decompress(raw))
    return True


@FUZZ
@given(st.sampled_from(["flair", "seg"]), nifti_images())
def test_random_headers_shapes_and_dtypes_brats(fuzz_root, which, img_spec):
    root = _fresh(fuzz_root, "headers")
    paths = _brats_case(root)
    assume(_save(img_spec, paths[which]))
    _load_everything(BratsDataset(), root, "BraTS2021_00000")


@FUZZ
@given(st.sampled_from(["image", "label"]), nifti_images())
def test_random_headers_shapes_and_dtypes_flare(fuzz_root, which, img_spec):
    root = _fresh(fuzz_root, "flare")
    paths = _flare_case(root)
    assume(_save(img_spec, paths[which]))
    _load_everything(Flare21Dataset(), root, "train_000")


@FUZZ
@given(st.sampled_from(["flair", "t1", "seg"]), nifti_images(wild=False))
def test_random_dtypes_and_values_reach_the_voxel_checks(fuzz_root, which, img_spec):
    root = _fresh(fuzz_root, "values")
    paths = _brats_case(root)
    assume(_save(img_spec, paths[which]))
    _load_everything(BratsDataset(), root, "BraTS2021_00000")
