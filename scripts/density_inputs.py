"""Inputs and analyses of scripts/density-bench.sh (docs/density.md).

  frames OUT.pdb                      the 100 AdK training frames (manifest order)
  perturb IN.pdb OUT.pdb SIGMA SEED   each residue's backbone moved rigidly by a
                                      random vector, RMS SIGMA Å per CA
  every IN.pdb OUT.pdb K              every K-th structure of IN
  select SAMPLES_DIR EVAL.json OUT.pdb WHICH   samples: 'invalid', or 'closed'/'open'
                                      (valid and within 3 Å of that reference)
"""
import json
import sys
import warnings

import numpy as np

warnings.filterwarnings("ignore")
import MDAnalysis as mda  # noqa: E402


def backbone_universe(path):
    u = mda.Universe(path)
    return u, u.select_atoms("protein and name N CA C")


def write(u, atoms, out, frames=None):
    with mda.Writer(out, multiframe=True, n_atoms=atoms.n_atoms) as w:
        for ts in u.trajectory if frames is None else (u.trajectory[i] for i in frames):
            w.write(atoms)


def frames(out):
    parts = [("examples/adk/dims.pdb"), ("examples/adk/closed.pdb"), ("examples/adk/open.pdb")]
    coords, ref = [], None
    for p in parts:
        u, a = backbone_universe(p)
        if ref is None:
            ref = (u, a)
        for ts in u.trajectory:
            coords.append(a.positions.copy())
    u, a = ref
    with mda.Writer(out, multiframe=True, n_atoms=a.n_atoms) as w:
        for c in coords:
            a.positions = c
            w.write(a)
    print(f"{out}: {len(coords)} frames")


def perturb(inp, out, sigma, seed):
    rng = np.random.default_rng(int(seed))
    u, a = backbone_universe(inp)
    resids = a.resindices
    n_res = len(np.unique(resids))
    with mda.Writer(out, multiframe=True, n_atoms=a.n_atoms) as w:
        for ts in u.trajectory:
            shift = rng.normal(0.0, float(sigma) / np.sqrt(3.0), size=(n_res, 3))
            _, inverse = np.unique(resids, return_inverse=True)
            a.positions = a.positions + shift[inverse]
            w.write(a)


def every(inp, out, k):
    u, a = backbone_universe(inp)
    write(u, a, out, range(0, len(u.trajectory), int(k)))


def select(samples_dir, evaluation, out, which, most=None):
    e = json.load(open(evaluation))
    keep = []
    for s in e["per_sample"]:
        if which == "invalid":
            ok = not s["valid"]
        else:
            ok = s["valid"] and s["rmsd"][which] <= 3.0
        if ok:
            keep.append(s["index"])
    if most is not None:
        keep = keep[: int(most)]
    pdb = [p for p in __import__("glob").glob(f"{samples_dir}/*.pdb") if "topology" not in p][0]
    u, a = backbone_universe(pdb)
    write(u, a, out, keep)
    print(f"{out}: {len(keep)} structures ({which})")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"frames": frames, "perturb": perturb, "every": every, "select": select}[cmd](*args)
