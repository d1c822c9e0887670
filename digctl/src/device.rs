//! Parsing `--device` and refusing CUDA clearly where there is none: a
//! request for a GPU never falls back to the CPU silently.

use anyhow::{bail, Result};
use tch::{Cuda, Device};

pub fn parse_device(s: &str) -> Result<Device> {
    let device = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => bail!("unknown --device {s:?}; use cpu, cuda or cuda:N"),
        },
    };
    let count = Cuda::device_count();
    if !Cuda::is_available() || count == 0 {
        bail!("--device {s} requested but no CUDA device is available to libtorch on this machine; use --device cpu");
    }
    if let Device::Cuda(n) = device {
        if n as i64 >= count {
            bail!("--device {s} requested but this machine has {count} CUDA device(s) (cuda:0..cuda:{})", count - 1);
        }
    }
    Ok(device)
}
