#!/usr/bin/env python3
"""Prepare the adenylate kinase (AdK) training frames from MDAnalysisTests.

Writes, next to this script:
  dims.pdb     98 models, backbone N, CA, C of 214 residues: the frames of
               the DIMS closed-to-open transition (adk_dims.dcd + adk.psf).
  closed.pdb   backbone (N, CA, C, O) of adk_closed.pdb (1AKE): the closed
               end state, a training frame and the evaluation reference.
  open.pdb     backbone (N, CA, C, O) of adk_open.pdb (4AKE): the open end state.
  adk.fasta    the sequence (from the topology).

Run with the project's venv (make setup installs MDAnalysis and MDAnalysisTests):
  .venv/bin/python examples/adk/prepare.py
"""
import os
import warnings

import MDAnalysis as mda
from MDAnalysis.lib.util import convert_aa_code
from MDAnalysisTests.datafiles import DCD, PSF

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.dirname(DCD)


def main():
    dims = mda.Universe(PSF, DCD)
    closed = mda.Universe(os.path.join(DATA, "adk_closed.pdb"))
    opened = mda.Universe(os.path.join(DATA, "adk_open.pdb"))
    sel = "protein and name N CA C"
    bb = dims.select_atoms(sel)
    bb_c, bb_o = closed.select_atoms(sel), opened.select_atoms(sel)
    assert len(bb) == len(bb_c) == len(bb_o) == 3 * 214, (len(bb), len(bb_c), len(bb_o))
    # Same residues, same atom order in all three.
    for a, b, c in zip(bb, bb_c, bb_o):
        assert (a.resname, a.name) == (b.resname, b.name) == (c.resname, c.name), (a, b, c)
    seq = "".join(convert_aa_code(r.resname) for r in bb.residues)
    with open(os.path.join(HERE, "adk.fasta"), "w") as f:
        f.write(">AdK adenylate kinase (E. coli), 214 residues, from MDAnalysisTests adk.psf\n")
        f.write(seq + "\n")
    out = os.path.join(HERE, "dims.pdb")
    with mda.Writer(out, n_atoms=len(bb), multiframe=True) as w:
        for _ in dims.trajectory:
            w.write(bb)
    for u, name in [(closed, "closed.pdb"), (opened, "open.pdb")]:
        u.select_atoms("protein and name N CA C O").write(os.path.join(HERE, name))
    print(f"wrote dims.pdb ({len(dims.trajectory)} DIMS frames), "
          f"closed.pdb, open.pdb, adk.fasta (L = {len(seq)})")


if __name__ == "__main__":
    main()
