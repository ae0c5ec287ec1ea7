"""Do the diffusion tests fail fakes?  Apply each mutant, run the tests, list what caught it.

A mutant is a small wrong version of one diffusion piece (CDM saliency, CDM features, MG,
timestep matching): the input intensity instead of the saliency, a random map, the last
step only, label 0, t = 0, block inputs instead of outputs, no mean over t, a signed sum,
a wrong perturbed embedding, the raw logit instead of log softmax, ...  Each one must make
at least one test fail.

How (the working tree is never modified): the packages and tests are copied to a
temporary directory (``wsss_bench/``, ``plugins/`` as ``wsss_bench_plugins/``, ``tests/``,
``pyproject.toml``), which goes first on PYTHONPATH, so imports and plugin entry points
resolve to the copy.  A baseline run of the unmodified copy must pass every test and import
from the copy.  Then, per mutant, one file of the copy is patched (the replaced text must
occur exactly once), the mutant's test files run with pytest (junit XML), the failing and
erroring tests are recorded, and the file is restored.

    python benchmarks/mutants.py [--threads 1] [--only NAME ...] [--out benchmarks/results/mutants.md]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import command_line, provenance_lines, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CDM_TESTS = ("tests/test_cdm.py",)
FEATURE_TESTS = ("tests/test_cdm_features.py",)
MG_TESTS = ("tests/test_mg.py",)
ALL_DIFFUSION = ("tests/test_diffusion.py", "tests/test_cdm.py", "tests/test_cdm_features.py", "tests/test_mg.py")

#: copy destination of each source folder
LAYOUT = {"wsss_bench": "wsss_bench", "plugins": "wsss_bench_plugins", "tests": "tests"}


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # in the repository, e.g. plugins/cdm.py
    old: str  # must occur exactly once
    new: str
    what: str
    tests: tuple[str, ...]
    issue: bool = False  # named in the issue (the others are ours)


MUTANTS = [
    # ------------------------------------------------------------------ CDM saliency
    Mutant("cdm-input-intensity", "plugins/cdm.py",
           "        acc += x1 - x2\n    return acc\n",
           "        acc += x1 - x2\n    return (1.0 - tau) * x0 + 1e-3 * acc\n",
           "acc = (1 - tau) x0 + 1e-3 acc: the map is the input intensity", CDM_TESTS, True),
    Mutant("cdm-random-map", "plugins/cdm.py",
           '        return minmax(reduce_channels(acc, self.p["reduce"]))  # (B, S, S) in [0, 1]',
           '        g = torch.Generator().manual_seed(0)\n'
           '        return minmax(torch.rand(acc.shape[0], *acc.shape[2:], generator=g)).to(acc.device)',
           "maps() returns a seeded random map", CDM_TESTS, True),
    Mutant("cdm-last-step-only", "plugins/cdm.py",
           "        acc += x1 - x2\n    return acc\n",
           "        acc = x1 - x2\n    return acc\n",
           "acc holds only the last step's difference", CDM_TESTS, True),
    Mutant("cdm-signed-sum", "plugins/cdm.py",
           'return acc.abs().sum(dim=1) if reduce == "abs" else acc.sum(dim=1)',
           'return acc.sum(dim=1) if reduce == "abs" else acc.sum(dim=1)',
           "channel reduction sum_c acc_c instead of sum_c |acc_c|", CDM_TESTS),
    Mutant("cdm-embedding-swapped", "plugins/cdm.py",
           "return tau * emb[1] + (1.0 - tau) * emb[0]",
           "return tau * emb[0] + (1.0 - tau) * emb[1]",
           "perturbed embedding tau E[0] + (1 - tau) E[1]", CDM_TESTS),
    Mutant("cdm-embedding-no-mix", "plugins/cdm.py",
           "return tau * emb[1] + (1.0 - tau) * emb[0]",
           "return emb[0].clone()",
           "perturbed embedding = E[0] (the label-0 branch, no interpolation)", CDM_TESTS),
    Mutant("cdm-no-clip", "plugins/cdm.py",
           "x0h = ((x - (1.0 - ab_i) ** 0.5 * eps) / ab_i ** 0.5).clamp(-1.0, 1.0)",
           "x0h = ((x - (1.0 - ab_i) ** 0.5 * eps) / ab_i ** 0.5)",
           "x0 prediction not clipped to [-1, 1]", CDM_TESTS),
    Mutant("cdm-no-rederived-eps", "plugins/cdm.py",
           "    eps2 = (x - ab_i ** 0.5 * x0h) / (1.0 - ab_i) ** 0.5\n",
           "    eps2 = eps\n",
           "the network's eps is used after clipping instead of the re-derived one", CDM_TESTS),
    Mutant("cdm-step-off-by-one", "plugins/cdm.py",
           "        i = q_ref - k\n",
           "        i = q_ref - k + 1\n",
           "first DDIM step from ab(400) instead of the reference's ab(399)", CDM_TESTS),
    Mutant("cdm-branches-start-apart", "plugins/cdm.py",
           "x2 = x1.clone()  # both branches start from the identical noisy image",
           "x2 = x1 + 1e-2 * noise.roll(1, -1)",
           "the perturbed branch starts from another noisy image", CDM_TESTS),
    Mutant("cdm-guidance-on-raw-eps", "plugins/cdm.py",
           "        x1 = ddim_step(x1, e1, ab(i), ab(i - 1), g1)\n        x2 = ddim_step(x2, e2, ab(i), ab(i - 1), g2)\n",
           "        x1 = ddim_step(x1, e1 if g1 is None else e1 - (1.0 - ab(i)) ** 0.5 * g1, ab(i), ab(i - 1))\n"
           "        x2 = ddim_step(x2, e2 if g2 is None else e2 - (1.0 - ab(i)) ** 0.5 * g2, ab(i), ab(i - 1))\n",
           "guidance applied to the network's eps before the clip (version 1's rule)", CDM_TESTS),
    Mutant("cdm-guidance-labels-swapped", "plugins/cdm.py",
           "g1 = guidance_gradient(x1, t, guidance_scale, classifier, label=1)\n"
           "            g2 = guidance_gradient(x2, t, guidance_scale, classifier, label=0)",
           "g1 = guidance_gradient(x1, t, guidance_scale, classifier, label=0)\n"
           "            g2 = guidance_gradient(x2, t, guidance_scale, classifier, label=1)",
           "guidance towards label 0 in branch 1 and label 1 in the perturbed branch", CDM_TESTS),
    # ------------------------------------------------------------------ CDM features
    Mutant("features-label-0", "wsss_bench/nn/diffusion_features.py",
           "labels = torch.full((b,), int(label), dtype=torch.long, device=dev)",
           "labels = torch.full((b,), 0, dtype=torch.long, device=dev)",
           "features computed with class label 0", FEATURE_TESTS, True),
    Mutant("features-t-always-0", "wsss_bench/nn/diffusion_features.py",
           "            tt = timesteps(t, b, dev)\n",
           "            tt = timesteps(0, b, dev)\n",
           "features computed with t = 0 for every timestep", FEATURE_TESTS, True),
    Mutant("features-network-told-t-0", "wsss_bench/nn/diffusion_features.py",
           "acts = block_activations(unet, xt, tt, labels, blocks)",
           "acts = block_activations(unet, xt, torch.zeros_like(tt), labels, blocks)",
           "noised at t, but the UNet is told t = 0", FEATURE_TESTS),
    Mutant("features-block-inputs", "wsss_bench/nn/diffusion_features.py",
           "            found[i] = output\n",
           "            found[i] = _inputs[0]\n",
           "features from the up blocks' inputs instead of their outputs", FEATURE_TESTS),
    Mutant("features-no-mean-over-t", "wsss_bench/nn/diffusion_features.py",
           "return [a.div_(len(ts)) for a in acc]",
           "return acc",
           "sum over t instead of the mean", FEATURE_TESTS),
    Mutant("features-last-t-only", "wsss_bench/nn/diffusion_features.py",
           "acc = acts if acc is None else [s.add_(a) for s, a in zip(acc, acts)]",
           "acc = acts",
           "only the last timestep's activations (no averaging over t)", FEATURE_TESTS),
    Mutant("features-gather-align-corners", "wsss_bench/nn/diffusion_features.py",
           "align_corners=False)[0, :, 0, :]  # (C_l, n_b)",
           "align_corners=True)[0, :, 0, :]  # (C_l, n_b)",
           "gather samples with align_corners=True (not Up + index)", FEATURE_TESTS),
    Mutant("features-raw-reference-t", "plugins/cdm_features.py",
           'self.ts = harness_timesteps(self.p["t_ref"], self.p["t_scale"], self.p["ref_schedule"], ctx.profile)',
           'self.ts = [int(t) for t in self.p["t_ref"]]',
           "quoted 4000-step t used as harness indices (no match())", FEATURE_TESTS),
    # ------------------------------------------------------------------ MG
    Mutant("mg-raw-logit", "plugins/mg.py",
           "return F.log_softmax(logits, dim=1)[:, POSITIVE_CLASS]",
           "return logits[:, POSITIVE_CLASS]",
           "gradient of the raw logit instead of log softmax", MG_TESTS, True),
    Mutant("mg-negative-class", "plugins/mg.py",
           "return F.log_softmax(logits, dim=1)[:, POSITIVE_CLASS]",
           "return F.log_softmax(logits, dim=1)[:, 0]",
           "gradient of log p(0) instead of log p(1)", MG_TESTS),
    Mutant("mg-signed-sum", "plugins/mg.py",
           'return g.abs().sum(dim=-3) if reduce == "abs" else g.sum(dim=-3)',
           'return g.sum(dim=-3) if reduce == "abs" else g.sum(dim=-3)',
           "channel reduction sum_c g_c instead of sum_c |g_c|", MG_TESTS),
    Mutant("mg-no-mean-over-t", "plugins/mg.py",
           "    return total / len(ts)\n",
           "    return total\n",
           "sum over t instead of the mean", MG_TESTS),
    Mutant("mg-classifier-told-t-0", "plugins/mg.py",
           "        g = input_gradients(model, xt, t)\n",
           "        g = input_gradients(model, xt, torch.zeros_like(t))\n",
           "noised at t, but the classifier is told t = 0", MG_TESTS),
    # ------------------------------------------------------------------ timestep matching
    Mutant("match-linear-rescale", "wsss_bench/nn/diffusion.py",
           "out = np.abs(ab[None, :] - ref[:, None]).argmin(axis=1)  # numpy: first minimum on ties",
           "out = np.asarray(refs) // 4",
           "match(i) = i // 4 (rescale the index instead of matching the noise level)", ALL_DIFFUSION),
    Mutant("match-off-by-one", "wsss_bench/nn/diffusion.py",
           "ref = np.asarray(_reference_ab(ref_schedule, T_REF))[refs]  # (n,)",
           "ref = np.asarray(_reference_ab(ref_schedule, T_REF))[np.clip(np.asarray(refs) + 20, 0, T_REF - 1)]",
           "match(i) matches the noise level of reference index i + 20", ALL_DIFFUSION),
]


# ---------------------------------------------------------------------------- machinery
def make_copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for src, dst in LAYOUT.items():
        shutil.copytree(ROOT / src, dest / dst, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def copy_path(repo_path: str) -> str:
    head, _, rest = repo_path.partition("/")
    return f"{LAYOUT.get(head, head)}/{rest}"


def run_tests(copy: Path, tests: tuple[str, ...], threads: int, tag: str) -> tuple[list[str], int, float]:
    """(failing or erroring test ids, number of tests run, seconds) of pytest on ``tests`` in ``copy``."""
    xml = copy / f"junit-{tag}.xml"
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONDONTWRITEBYTECODE": "1", "CI": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                           *tests], cwd=copy, env=env, capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - t0
    if not xml.is_file():
        return [f"(pytest did not run: exit {proc.returncode}: {proc.stdout[-400:]} {proc.stderr[-400:]})"], 0, seconds
    failed, total = [], 0
    for case in ET.parse(xml).getroot().iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            module = case.get("classname", "").rsplit(".", 1)[-1]
            failed.append(f"{module}::{case.get('name')}")
    if total == 0:
        failed = [f"(no test collected: exit {proc.returncode}: {proc.stdout[-600:]})"]
    return failed, total, seconds


def check_copy_is_imported(copy: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    code = ("import wsss_bench, wsss_bench_plugins.cdm as c, wsss_bench.nn.diffusion_features as d; "
            "print(wsss_bench.__file__); print(c.__file__); print(d.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True, check=True)
    for line in out.stdout.split():
        if not Path(line).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"the copy is not what gets imported: {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="mutant names to run (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mutants.md")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.only and len(mutants) != len(args.only):
        raise SystemExit(f"unknown mutant(s): {sorted(set(args.only) - {m.name for m in MUTANTS})}")
    import torch

    torch.set_num_threads(args.threads)  # this process runs no tests; the number is recorded
    command = command_line(argv=sys.argv[1:])
    t_start = time.time()
    sources = sorted({m.path for m in MUTANTS} | set(ALL_DIFFUSION) | {"tests/diffusion_helpers.py"})

    with tempfile.TemporaryDirectory(prefix="wsss-mutants-") as tmp:
        copy = Path(tmp)
        make_copy(copy)
        check_copy_is_imported(copy)
        base_tests = tuple(sorted({t for m in mutants for t in m.tests}))
        failed, total, secs = run_tests(copy, base_tests, args.threads, "baseline")
        print(f"baseline: {total} tests, {len(failed)} failing, {secs:.0f}s", flush=True)
        if failed or total == 0:
            raise SystemExit(f"the unmodified copy must pass: {failed}")
        rows = []
        for m in mutants:
            target = copy / copy_path(m.path)
            original = target.read_text()
            count = original.count(m.old)
            if count != 1:
                raise SystemExit(f"mutant {m.name}: the text to replace occurs {count} times in {m.path}")
            target.write_text(original.replace(m.old, m.new))
            try:
                caught, n, secs = run_tests(copy, m.tests, args.threads, m.name)
            finally:
                target.write_text(original)
            rows.append((m, caught, n, secs))
            print(f"{m.name}: {'CAUGHT' if caught else 'NOT CAUGHT'} by {len(caught)} of {n} tests ({secs:.0f}s)",
                  flush=True)

    missed = [m.name for m, caught, _, _ in rows if not caught]
    lines = ["# Mutants of the diffusion pieces, and the tests that catch them", "",
             *provenance_lines(command, profile="smoke (the tests' tiny networks and synthetic tensors)",
                               sources=sources, note_phantom="not used (the tests use synthetic tensors)"),
             f"- baseline (no mutant): {total} tests in {', '.join(base_tests)}, all passing",
             f"- wall time: {time.time() - t_start:.0f}s", "",
             f"**{len(rows) - len(missed)} of {len(rows)} mutants caught**" + (
                 f"; NOT caught: {', '.join(missed)}" if missed else " (every mutant makes at least one test fail)."),
             "", "Issue = named in the issue (the others are ours). Tests run per mutant: the files listed.", "",
             "| mutant | issue | file | what it changes | tests run | failing tests (caught by) |",
             "|---|---|---|---|---|---|"]
    for m, caught, n, secs in rows:
        caught_txt = "<br>".join(f"`{c}`" for c in caught) if caught else "**none: NOT CAUGHT**"
        what = m.what.replace("|", "\\|")  # a pipe would end the table cell
        lines.append(f"| `{m.name}` | {'yes' if m.issue else ''} | `{m.path}` | {what} | "
                     f"{n} in {', '.join(t.replace('tests/', '') for t in m.tests)} | {caught_txt} |")
    write_result(args.out, lines)
    if missed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
