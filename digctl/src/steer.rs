//! `--steer FILE|PRESET` for `digctl sample` and `digctl submit`: a steering
//! file (JSON, the schema of `dig_model::sampling::steering::SteerSpec`) or
//! a preset name, with every potential's `reference` (a PDB path relative to
//! the file) read into `reference_ca`, the form a job carries.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use dig_model::backbone::read_pdb;
use dig_model::sampling::steering::{preset, SteerSpec, PRESETS};

/// The steering of `arg`: a preset name or a JSON file.
pub fn load(arg: &str) -> Result<SteerSpec> {
    if let Some(spec) = preset(arg) {
        return Ok(spec);
    }
    let path = Path::new(arg);
    if !path.exists() {
        bail!(
            "--steer {arg}: no such file and not a preset (presets: {})",
            PRESETS.join(", ")
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read --steer {arg}"))?;
    let mut spec = SteerSpec::from_json(&text).map_err(|e| anyhow!("--steer {arg}: {e}"))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for (i, p) in spec.potentials.iter_mut().enumerate() {
        if let (Some(reference), None) = (&p.reference, &p.reference_ca) {
            let file = base.join(reference);
            let t = read_pdb(&file)
                .with_context(|| format!("--steer {arg}: potentials[{i}].reference"))?;
            let first = t.frames.first().ok_or_else(|| {
                anyhow!(
                    "--steer {arg}: potentials[{i}].reference {} has no model",
                    file.display()
                )
            })?;
            p.reference_ca = Some(first.iter().map(|res| res[1].map(f64::from)).collect());
        }
    }
    Ok(spec)
}
