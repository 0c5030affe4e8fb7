//! A CPU peak probe: how many FLOP/s candle's f32 matmul reaches on this
//! machine. There is no datasheet peak for a CPU that the ledger can trust
//! (clocks, SIMD width and thread count all vary), so a projection for a CPU
//! takes its peak from this measurement instead of `projection::peak_flops`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::device::DeviceInfo;
use crate::error::{Error, Result};
use crate::progress::Progress;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeakMeasurement {
    /// Side of the square matrices multiplied.
    pub size: usize,
    /// Timed matmuls (after one untimed warm-up).
    pub repeats: usize,
    /// Threads candle's CPU kernels use.
    pub threads: usize,
    /// The CPU model as the OS reports it.
    pub cpu_model: String,
    /// 2·size³: one multiply and one add per inner-product term.
    pub flops_per_matmul: f64,
    pub best_seconds: f64,
    pub median_seconds: f64,
    /// flops_per_matmul / best_seconds: the peak figure.
    pub flops_per_second: f64,
    /// flops_per_matmul / median_seconds: what a busy machine gives.
    pub median_flops_per_second: f64,
}

/// Times `repeats` f32 matmuls of two `size` × `size` matrices on the CPU,
/// after one warm-up (page faults, thread-pool start, packing buffers), and
/// reports the best and median rates. The best is the peak; on a shared
/// machine the median shows how far other work pulls it down.
pub fn measure_cpu_peak(size: usize, repeats: usize) -> Result<PeakMeasurement> {
    if size == 0 || repeats == 0 {
        return Err(Error::Invalid(format!(
            "peak probe needs size >= 1 and repeats >= 1, got size {size}, repeats {repeats}; \
             try size 1024, repeats 5"
        )));
    }
    let dev = Device::Cpu;
    let a = Tensor::rand(-1f32, 1f32, (size, size), &dev)?; // (n, n)
    let b = Tensor::rand(-1f32, 1f32, (size, size), &dev)?; // (n, n)
    let warm = a.matmul(&b)?; // (n, n)
    if warm.dims() != [size, size] || warm.dtype() != DType::F32 {
        return Err(Error::Shape(format!(
            "peak probe: matmul returned {:?} {:?}, expected [{size}, {size}] f32",
            warm.dims(),
            warm.dtype()
        )));
    }
    let mut secs = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t0 = Instant::now();
        // candle's CPU ops run eagerly: the product is complete when matmul returns.
        let c = a.matmul(&b)?; // (n, n)
        secs.push(t0.elapsed().as_secs_f64());
        drop(c);
    }
    secs.sort_by(f64::total_cmp);
    let best = secs[0];
    let median = if repeats % 2 == 1 {
        secs[repeats / 2]
    } else {
        0.5 * (secs[repeats / 2 - 1] + secs[repeats / 2])
    };
    if best <= 0.0 {
        return Err(Error::Invalid(format!(
            "peak probe: a {size} x {size} matmul finished below the timer's resolution; use a larger size"
        )));
    }
    let n = size as f64;
    let flops = 2.0 * n * n * n;
    Ok(PeakMeasurement {
        size,
        repeats,
        threads: candle_core::utils::get_num_threads(),
        cpu_model: crate::device::cpu_model_name(),
        flops_per_matmul: flops,
        best_seconds: best,
        median_seconds: median,
        flops_per_second: flops / best,
        median_flops_per_second: flops / median,
    })
}

/// Peak FLOP/s of all the run's devices, for the ledger's MFU column: the
/// config's per-device figure, else the datasheet f32 peak of a known GPU, else
/// (CPU) a short GEMM probe on this machine.
pub fn for_run(
    cfg: &Config,
    info: &DeviceInfo,
    dtype: candle_core::DType,
    progress: &dyn Progress,
) -> Result<Option<f64>> {
    let count = info.count as f64;
    if let Some(p) = cfg.cost.peak_flops_per_device {
        return Ok(Some(p * count));
    }
    if info.kind == "cpu" {
        let m = crate::cost::peak::measure_cpu_peak(1024, 5)?;
        progress.message(&format!(
            "peak: {:.1} GFLOP/s (f32 GEMM probe, {} threads); MFU in the ledger is measured against it",
            m.flops_per_second / 1e9,
            m.threads
        ));
        return Ok(Some(m.flops_per_second));
    }
    // Against the peak of the precision the matmuls run in.
    let precision = match dtype {
        candle_core::DType::F32 => crate::cost::projection::Precision::Fp32,
        _ => crate::cost::projection::Precision::Bf16,
    };
    Ok(crate::cost::projection::peak_flops(&info.name, precision).map(|p| p * count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_probe_reports_a_finite_positive_rate() -> Result<()> {
        let m = measure_cpu_peak(128, 4)?;
        assert_eq!(m.size, 128);
        assert_eq!(m.repeats, 4);
        assert_eq!(m.flops_per_matmul, 2.0 * 128f64.powi(3));
        assert!(m.flops_per_second.is_finite() && m.flops_per_second > 0.0);
        assert!(m.median_flops_per_second.is_finite() && m.median_flops_per_second > 0.0);
        // The best time is never slower than the median.
        assert!(m.best_seconds <= m.median_seconds);
        assert!(m.flops_per_second >= m.median_flops_per_second);
        assert!((m.flops_per_second * m.best_seconds - m.flops_per_matmul).abs() < 1e-3 * m.flops_per_matmul);
        assert!(m.threads >= 1);
        assert!(!m.cpu_model.is_empty());
        Ok(())
    }

    #[test]
    fn zero_size_or_repeats_is_an_error() {
        let err = measure_cpu_peak(0, 3).unwrap_err().to_string();
        assert!(err.contains("size >= 1"), "{err}");
        assert!(measure_cpu_peak(16, 0).is_err());
    }
}
