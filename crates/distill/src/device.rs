//! Device selection. Asking for CUDA in a build without the `cuda` feature, or
//! on a machine without a GPU, is an error: falling back to the CPU would make
//! the GPU-hour ledger lie.

use candle_core::Device;

use crate::error::{Error, Result};

/// A parsed `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    Cpu,
    Cuda(usize),
}

pub fn parse_device_name(s: &str) -> Result<DeviceName> {
    match s.trim() {
        "cpu" => Ok(DeviceName::Cpu),
        "cuda" => Ok(DeviceName::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceName::Cuda)
            .ok_or_else(|| Error::Device(format!("unknown device {other:?}; use \"cpu\", \"cuda\" or \"cuda:N\""))),
    }
}

/// Opens the device, never substituting another one.
pub fn open(name: DeviceName) -> Result<Device> {
    match name {
        DeviceName::Cpu => Ok(Device::Cpu),
        DeviceName::Cuda(ordinal) => open_cuda(ordinal),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        Error::Device(format!(
            "cannot open CUDA device {ordinal}: {e}. Check `nvidia-smi` and CUDA_VISIBLE_DEVICES, or run with --device cpu"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(Error::Device(format!(
        "cuda:{ordinal} requested, but this build has no CUDA support; rebuild with \
         `cargo build --release --features cuda`, or run with --device cpu"
    )))
}

/// What the cost ledger records about the device.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DeviceInfo {
    /// "cpu" or "cuda".
    pub kind: String,
    /// The CPU model (from the OS) or GPU name.
    pub name: String,
    /// Billed units: CPU cores in use, or GPUs.
    pub count: usize,
}

pub fn describe(device: &Device) -> DeviceInfo {
    match device {
        Device::Cuda(_) => DeviceInfo {
            kind: "cuda".into(),
            name: cuda_name(device),
            count: 1,
        },
        _ => DeviceInfo {
            kind: "cpu".into(),
            name: cpu_model_name(),
            count: rayon::current_num_threads(),
        },
    }
}

#[cfg(feature = "cuda")]
fn cuda_name(device: &Device) -> String {
    match device.as_cuda_device() {
        Ok(d) => d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|_| "unknown NVIDIA GPU".into()),
        Err(_) => "unknown NVIDIA GPU".into(),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_name(_device: &Device) -> String {
    "unknown NVIDIA GPU".into()
}

/// The CPU model as the OS reports it (`/proc/cpuinfo` on Linux).
pub fn cpu_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() -> Result<()> {
        assert_eq!(parse_device_name("cpu")?, DeviceName::Cpu);
        assert_eq!(parse_device_name("cuda")?, DeviceName::Cuda(0));
        assert_eq!(parse_device_name("cuda:3")?, DeviceName::Cuda(3));
        assert!(parse_device_name("gpu").is_err());
        assert!(parse_device_name("cuda:x").is_err());
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = open(DeviceName::Cuda(0)).unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
