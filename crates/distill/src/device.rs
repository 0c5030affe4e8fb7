//! Device selection. Asking for CUDA in a build without the `cuda` feature, or
//! on a machine without a GPU, is an error: falling back to the CPU would make
//! the GPU-hour ledger lie.

use candle_core::Device;

use crate::config::DeviceName;
use crate::error::{Error, Result};

/// Opens the device, never substituting another one.
pub fn open(name: DeviceName) -> Result<Device> {
    match name {
        DeviceName::Cpu => Ok(Device::Cpu),
        DeviceName::Cuda(ordinal) => open_cuda(ordinal),
    }
}

/// Asks the driver first (cuInit, then the device count) so that the error names what is
/// missing: the driver, any GPU, or this ordinal. A binary built with `cuda` is linked
/// against libcuda.so.1, so where no driver is installed at all the dynamic loader stops
/// it before `main` (docs/gpu.md); the stand-in CI links against answers every call with
/// CUDA_ERROR_STUB_LIBRARY, which lands here as "no NVIDIA driver".
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    use candle_core::cuda_backend::cudarc::driver::result;

    result::init().map_err(|e| Error::Device(init_failure(ordinal, e.0, &e.to_string())))?;
    let count = result::device::get_count().map_err(|e| {
        Error::Device(format!(
            "cuda:{ordinal}: cannot count the CUDA devices: {e}{}",
            way_out()
        ))
    })?;
    let count = usize::try_from(count).unwrap_or(0);
    if ordinal >= count {
        return Err(Error::Device(format!(
            "cuda:{ordinal} requested, but the NVIDIA driver sees {count} CUDA device(s){}; \
             use --device cuda:0 to cuda:{} (`nvidia-smi` lists them){}",
            visible_devices(),
            count.saturating_sub(1),
            way_out()
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        Error::Device(format!(
            "cannot open CUDA device {ordinal}: {e}. Check `nvidia-smi` and CUDA_VISIBLE_DEVICES, or run with --device cpu"
        ))
    })
}

/// What a failed cuInit means, by its code, and the way out.
#[cfg(feature = "cuda")]
fn init_failure(
    ordinal: usize,
    code: candle_core::cuda_backend::cudarc::driver::sys::CUresult,
    detail: &str,
) -> String {
    use candle_core::cuda_backend::cudarc::driver::sys::CUresult as R;

    let what = match code {
        R::CUDA_ERROR_STUB_LIBRARY => "no NVIDIA driver: the libcuda.so.1 this process loaded is a link-only stub \
             (CI's scripts/cuda-stubs.py, or the CUDA toolkit's lib64/stubs), not the driver's. Install the NVIDIA \
             driver, and keep stub folders off LD_LIBRARY_PATH"
            .to_string(),
        R::CUDA_ERROR_NO_DEVICE => format!(
            "no CUDA device: the NVIDIA driver is installed but reports no GPU{}. Check `nvidia-smi`",
            visible_devices()
        ),
        R::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH => "the NVIDIA kernel module and libcuda.so.1 are of different \
             driver versions (a driver update without a reboot, or a stray libcuda on LD_LIBRARY_PATH). Reboot, \
             or make the driver's own libcuda.so.1 the one loaded"
            .to_string(),
        _ => format!("the NVIDIA driver failed to start ({detail}). Check `nvidia-smi` and `dmesg`"),
    };
    format!("cuda:{ordinal}: {what}{}", way_out())
}

/// "; or run with --device cpu": every CUDA error ends with the way to run anyway.
#[cfg(feature = "cuda")]
fn way_out() -> &'static str {
    "; or run with --device cpu"
}

/// " (CUDA_VISIBLE_DEVICES=...)" when it is set, since it decides which GPUs the driver shows.
#[cfg(feature = "cuda")]
fn visible_devices() -> String {
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) => format!(" (CUDA_VISIBLE_DEVICES={v:?} limits which GPUs it shows)"),
        Err(_) => String::new(),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(Error::Device(format!(
        "cuda:{ordinal} requested, but this build has no CUDA support; rebuild with \
         `cargo build --release --features cuda`, or run with --device cpu"
    )))
}

/// What the cost ledger records about the device. Fields added after the first
/// ledgers carry `#[serde(default)]`, so older `ledger.json` files still load.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DeviceInfo {
    /// "cpu" or "cuda".
    pub kind: String,
    /// The CPU model (from the OS) or GPU name.
    pub name: String,
    /// Billed units: CPU cores in use, or GPUs.
    pub count: usize,
    /// Memory in bytes: the GPU's total memory, or the host's RAM (`MemTotal` in
    /// `/proc/meminfo`) on CPU. None when unknown.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// GPUs visible to this process (after `CUDA_VISIBLE_DEVICES`); None on CPU.
    #[serde(default)]
    pub visible_gpus: Option<usize>,
    /// The CUDA device ordinal in use; None on CPU.
    #[serde(default)]
    pub ordinal: Option<usize>,
    /// CUDA compute capability, "major.minor" as `nvidia-smi` prints it (e.g. "9.0").
    #[serde(default)]
    pub compute_capability: Option<String>,
}

impl DeviceInfo {
    /// The three original fields; the inventory fields are left unknown (None).
    pub fn new(kind: impl Into<String>, name: impl Into<String>, count: usize) -> Self {
        Self {
            kind: kind.into(),
            name: name.into(),
            count,
            ..Self::default()
        }
    }
}

/// Describes the device for the ledger. Never fails: what cannot be read is
/// recorded as unknown rather than stopping a run.
pub fn describe(device: &Device) -> DeviceInfo {
    match device {
        Device::Cuda(_) => describe_cuda(device),
        _ => DeviceInfo {
            memory_bytes: host_memory_bytes(),
            ..DeviceInfo::new("cpu", cpu_model_name(), cpu_cores_available())
        },
    }
}

/// The CPU cores this process may run on (its affinity mask and cgroup quota, as the
/// OS reports them): what a CPU run occupies and is billed for, whatever number of
/// threads it starts.
pub fn cpu_cores_available() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

const UNKNOWN_GPU: &str = "unknown NVIDIA GPU";

#[cfg(feature = "cuda")]
fn describe_cuda(device: &Device) -> DeviceInfo {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;

    let mut info = DeviceInfo::new("cuda", UNKNOWN_GPU, 1);
    if let Ok(d) = device.as_cuda_device() {
        let stream = d.cuda_stream();
        let ctx = stream.context();
        if let Ok(name) = ctx.name() {
            info.name = name;
        }
        info.memory_bytes = ctx.total_mem().ok().map(|b| b as u64);
        info.ordinal = Some(ctx.ordinal());
        info.compute_capability = ctx
            .compute_capability()
            .ok()
            .map(|(major, minor)| format!("{major}.{minor}"));
    }
    info.visible_gpus = CudaContext::device_count().ok().and_then(|n| usize::try_from(n).ok());
    info
}

/// Without the `cuda` feature no CUDA device can be opened; kept for the match.
#[cfg(not(feature = "cuda"))]
fn describe_cuda(_device: &Device) -> DeviceInfo {
    DeviceInfo::new("cuda", UNKNOWN_GPU, 1)
}

/// Total RAM in bytes from `/proc/meminfo`; None where that file is missing.
pub fn host_memory_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .as_deref()
        .and_then(parse_mem_total)
}

/// The `MemTotal:       16318712 kB` line of `/proc/meminfo`, in bytes.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let rest = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut words = rest.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    let unit = match words.next() {
        Some("kB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    n.checked_mul(unit)
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
    fn cpu_inventory_has_ram_and_no_gpus() {
        let info = describe(&Device::Cpu);
        assert_eq!(info.kind, "cpu");
        assert_eq!(info.count, cpu_cores_available());
        assert!(info.count >= 1);
        assert_eq!(
            (info.visible_gpus, info.ordinal, info.compute_capability),
            (None, None, None)
        );
        if std::path::Path::new("/proc/meminfo").is_file() {
            let ram = info.memory_bytes.unwrap_or(0);
            // Any machine that builds this crate has between 256 MiB and 64 TiB.
            assert!((256 << 20..64 << 40).contains(&ram), "{ram}");
        }
    }

    #[test]
    fn parses_mem_total() {
        let text = "MemTotal:       16318712 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_mem_total(text), Some(16_318_712 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 5 MB\n"), None);
    }

    /// Ledgers written before the inventory fields existed still load.
    #[test]
    fn old_device_info_json_still_loads() -> std::result::Result<(), serde_json::Error> {
        let old: DeviceInfo = serde_json::from_str(r#"{"kind":"cuda","name":"NVIDIA H800","count":8}"#)?;
        assert_eq!(old, DeviceInfo::new("cuda", "NVIDIA H800", 8));
        assert_eq!(old.memory_bytes, None);
        let new = DeviceInfo {
            memory_bytes: Some(80 << 30),
            visible_gpus: Some(8),
            ordinal: Some(3),
            compute_capability: Some("9.0".into()),
            ..old
        };
        let back: DeviceInfo = serde_json::from_str(&serde_json::to_string(&new)?)?;
        assert_eq!(back, new);
        Ok(())
    }

    /// Each cuInit failure names what is missing and ends with the way out.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_init_failures_name_what_is_missing() {
        use candle_core::cuda_backend::cudarc::driver::sys::CUresult as R;

        let stub = init_failure(0, R::CUDA_ERROR_STUB_LIBRARY, "");
        assert!(stub.starts_with("cuda:0: no NVIDIA driver"), "{stub}");
        let none = init_failure(1, R::CUDA_ERROR_NO_DEVICE, "");
        assert!(none.starts_with("cuda:1: no CUDA device"), "{none}");
        let mismatch = init_failure(0, R::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH, "");
        assert!(mismatch.contains("different driver versions"), "{mismatch}");
        let other = init_failure(0, R::CUDA_ERROR_UNKNOWN, "DriverError(CUDA_ERROR_UNKNOWN)");
        assert!(other.contains("CUDA_ERROR_UNKNOWN"), "{other}");
        for msg in [stub, none, mismatch, other] {
            assert!(msg.ends_with("--device cpu"), "{msg}");
        }
    }

    /// Without a GPU (CI), opening CUDA fails and names the missing driver or device;
    /// on a GPU box it opens. It never hands back the CPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_open_is_the_gpu_or_an_error_never_the_cpu() {
        match open(DeviceName::Cuda(0)) {
            Ok(dev) => assert!(dev.is_cuda(), "{dev:?}"),
            Err(e) => {
                let e = e.to_string();
                // "no NVIDIA driver", "no CUDA device: the NVIDIA driver ...", or a driver fault.
                assert!(e.contains("NVIDIA driver"), "{e}");
                eprintln!("(no GPU here: {e})");
            }
        }
        let err = open(DeviceName::Cuda(4096)).unwrap_err().to_string();
        assert!(err.contains("cuda:4096"), "{err}");
    }

    /// The GPU inventory the ledger records, read from the driver: name, memory, compute
    /// capability, ordinal, visible GPUs. Compiled in every `cuda` build; skipped, with a
    /// message, where no GPU is present (scripts/gpu-check.sh runs it on one).
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_inventory_names_the_gpu() {
        let dev = match open(DeviceName::Cuda(0)) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped cuda_inventory_names_the_gpu: no CUDA device ({e})");
                return;
            }
        };
        let info = describe(&dev);
        eprintln!("cuda inventory: {info:?}");
        assert_eq!((info.kind.as_str(), info.count, info.ordinal), ("cuda", 1, Some(0)));
        assert_ne!(info.name, UNKNOWN_GPU);
        assert!(info.visible_gpus.unwrap_or(0) >= 1, "{info:?}");
        // Any CUDA GPU this code supports has between 1 GiB and 1 TiB.
        assert!((1 << 30..1 << 40).contains(&info.memory_bytes.unwrap_or(0)), "{info:?}");
        let cc = info.compute_capability.clone().unwrap_or_default();
        let parsed: Vec<u32> = cc.split('.').filter_map(|p| p.parse().ok()).collect();
        assert!(parsed.len() == 2 && parsed[0] >= 5, "compute capability {cc:?}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = open(DeviceName::Cuda(0)).unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
