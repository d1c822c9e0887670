//! `digctl frames`: what the training reader makes of a structure file, so
//! that data can be checked before a long `digctl train`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use dig_model::backbone::read_trajectory;
use dig_model::features::Features;
use dig_model::training::frames;

#[derive(Args)]
pub struct FramesArgs {
    /// Multi-model PDB, DCD or XTC.
    #[arg(long)]
    trajectory: PathBuf,
    /// Topology for DCD (PSF or PDB) and XTC (PDB or GRO).
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Features .npz to check the residue count (and sequence) against.
    #[arg(long)]
    features: Option<PathBuf>,
}

pub fn run(args: FramesArgs) -> Result<()> {
    let traj = read_trajectory(&args.trajectory, args.topology.as_deref())?;
    for (k, f) in traj.frames.iter().enumerate() {
        let atoms: Vec<[[f64; 3]; 3]> = f.iter().map(|r| r.map(|a| a.map(f64::from))).collect();
        frames(&atoms)
            .map_err(|m| anyhow::anyhow!("{}: frame {}: {m}", args.trajectory.display(), k + 1))?;
    }
    let seq = traj.sequence();
    println!(
        "{}: {} frames, {} residues ({} .. {})",
        args.trajectory.display(),
        traj.frames.len(),
        traj.len_residues(),
        traj.residues[0],
        traj.residues[traj.len_residues() - 1]
    );
    println!("sequence: {seq}");
    if let Some(path) = &args.features {
        let f = Features::from_npz(path)?;
        if f.len() as usize != traj.len_residues() {
            anyhow::bail!(
                "{} has {} residues but the features {} are for L = {}",
                args.trajectory.display(),
                traj.len_residues(),
                path.display(),
                f.len()
            );
        }
        match &f.sequence {
            Some(s) if *s != seq => println!(
                "features: L = {} matches; their sequence differs at {} positions (X counts as a wildcard in training)",
                f.len(),
                s.chars().zip(seq.chars()).filter(|(a, b)| a != b).count()
            ),
            _ => println!("features: L = {} matches", f.len()),
        }
    }
    Ok(())
}
