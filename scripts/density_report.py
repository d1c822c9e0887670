"""Summarises density-bench.sh's outputs (OUT dir) as the tables of docs/density.md."""
import json
import os
import sys

import numpy as np

out = sys.argv[1]


def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None


def results(name):
    d = load(name)
    return None if d is None else d["results"]


for name in ("roundtrip.json", "roundtrip-flow.json"):
    r = results(name)
    if r:
        rt = np.array([x["round_trip_ca_rmsd"] for x in r])
        d = load(name)
        print(f"round trip ({d['ode']} ODE, {d['flow_steps']} Heun steps each way), {len(rt)} training frames: "
              f"CA-RMSD median {np.median(rt):.4f} Å, max {rt.max():.4f} Å, "
              f"{(rt < 0.1).sum()} of {len(rt)} within 0.1 Å")

f, p1, p2 = (results(f"rank-{n}.json") for n in ("frames20", "perturbed1", "perturbed2"))
if f and p1 and p2:
    lf = np.array([x["log_density"] for x in f])
    for name, p in (("1 Å", p1), ("2 Å", p2)):
        lp = np.array([x["log_density"] for x in p])
        se = np.array([np.hypot(a["std_error"], b["std_error"]) for a, b in zip(f, p)])
        wins = (lf > lp).mean() * 100
        print(f"perturbed by {name}: training frame scores higher in {wins:.0f} % of {len(lf)} pairs; "
              f"median difference {np.median(lf - lp):.1f} nats (median error {np.median(se):.1f})")

for s in ("closed", "open"):
    st = results(f"state-{s}.json")
    near = results(f"near-{s}.json")
    line = f"{s}: "
    if st:
        line += f"{s}.pdb {st[0]['log_density']:.1f} ± {st[0]['std_error']:.1f}"
    if near:
        v = np.array([x["log_density"] for x in near])
        line += (f"; {len(v)} valid demo samples within 3 Å: median {np.median(v):.1f}, "
                 f"mean {v.mean():.1f} ± {v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float('nan'):.1f}")
    if st or near:
        print(line)

def moved(t):
    # CA-RMSD of each partial-diffusion output to its input (sample i <- structure i).
    import warnings
    warnings.filterwarnings("ignore")
    import MDAnalysis as mda
    from MDAnalysis.analysis.rms import rmsd
    a = mda.Universe(os.path.join(out, "invalid.pdb")).select_atoms("name CA")
    ua = a.universe
    ub = mda.Universe(os.path.join(out, f"partial-{t}", "samples.pdb"))
    b = ub.select_atoms("name CA")
    d = []
    for i in range(min(len(ua.trajectory), len(ub.trajectory))):
        ua.trajectory[i]
        ub.trajectory[i]
        d.append(rmsd(a.positions, b.positions, center=True, superposition=True))
    return np.array(d)


for t in ("0.1", "0.2", "0.3", "0.5", "0.7"):
    e = load(f"partial-{t}/evaluation.json")
    if e:
        d = moved(t)
        print(f"partial diffusion from t = {t}: {e['valid']} of {e['num_samples']} made valid "
              f"({e['valid_fraction'] * 100:.1f} %); moved (CA-RMSD to the input) median {np.median(d):.2f} Å, "
              f"max {d.max():.2f} Å; {e['nearest_frame']['fraction_farther_than_6A'] * 100:.0f} % farther than 6 Å "
              f"from every training frame")

p = load("path/path.json")
e = load("path/evaluation.json")
if p and e:
    near = [s["nearest_frame_rmsd"] for s in e["per_sample"]]
    valid = sum(1 for s in e["per_sample"] if s["valid"])
    print(f"closed-to-open path, {len(near)} frames: nearest training frame CA-RMSD median "
          f"{np.median(near):.2f} Å, max {max(near):.2f} Å; {valid} physically valid")
    print("frame  fraction  log-density  ± err   nearest frame  to closed  to open  valid")
    for x, s in zip(p["path"], e["per_sample"]):
        print(f"{x['frame']:>5}  {x['fraction']:>8.2f}  {x['log_density'] if x['log_density'] is not None else float('nan'):>11.1f}  "
              f"{x['std_error'] or 0:>5.1f}  {s['nearest_frame_rmsd']:>13.2f}  {s['rmsd']['closed']:>9.2f}  "
              f"{s['rmsd']['open']:>7.2f}  {'yes' if s['valid'] else 'no'}")
