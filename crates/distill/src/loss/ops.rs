//! The candle ops of the full-distribution losses, each with its analytic backward:
//! `DivergenceRows` and `CrossEntropyRows` (student and teacher logits in, one value per
//! row out) and their gradient ops. The teacher never gets a gradient.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, MetalStorage, Shape, Tensor, WithDType,
};

#[cfg(feature = "cuda")]
use super::cuda;
use super::family::Divergence;
use super::rows::*;
use crate::kernels::cpu::{f32_slice, u32_slice, with_float_slice};

/// (student (N, V), teacher (N, V)) -> per-row divergence (N,) f32.
pub(crate) struct DivergenceRows {
    pub(crate) divergence: Divergence, // canonical: JSD end points already replaced
    pub(crate) temperature: f64,
}

/// (student (N, V), teacher (N, V), grad_rows (N,) f32) -> d loss / d student (N, V),
/// in the student's dtype. Applied without a backward of its own.
pub(crate) struct DivergenceRowsGrad {
    divergence: Divergence,
    temperature: f64,
}

/// (student (N, V), targets (N,) u32) -> per-row cross-entropy (N,) f32.
pub(crate) struct CrossEntropyRows;

/// (student (N, V), targets (N,) u32, grad_rows (N,) f32) -> d loss / d student (N, V).
pub(crate) struct CrossEntropyRowsGrad;

pub(crate) fn no_kernel(op: &'static str, device: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: the fused distillation loss has no {device} kernel yet; use the reference loss \
         (loss::reference, loss::family::divergence_rows_reference) on this device"
    ))
    .bt()
}

/// The shape of the rows, (..., V) -> (...), and V.
pub(crate) fn rows_and_vocab(layout: &Layout) -> (Shape, usize) {
    let dims = layout.dims();
    match dims.split_last() {
        Some((&v, rows)) => (Shape::from(rows.to_vec()), v),
        None => (Shape::from(()), 1),
    }
}

pub(crate) fn check_rows(op: &'static str, what: &str, len: usize, rows: usize) -> candle_core::Result<()> {
    if len == rows {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(format!("{op}: {what} has {len} elements for {rows} rows")).bt())
    }
}

impl CustomOp2 for DivergenceRows {
    fn name(&self) -> &'static str {
        "distill-divergence-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: l1.shape().clone(),
                rhs: l2.shape().clone(),
                op: self.name(),
            }
            .bt());
        }
        let (rows, v) = rows_and_vocab(l1);
        let k = Kernel::new(self.divergence, self.temperature);
        let out = with_float_slice!(self.name(), s1, l1, |s| with_float_slice!(self.name(), s2, l2, |t| {
            forward_rows(&k, s, t, v)
        }));
        Ok((CpuStorage::F32(out), rows))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            cuda::divergence_rows_fwd(self.name(), self.divergence, self.temperature, s1, l1, s2, l2)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s1, l1, s2, l2);
            Err(no_kernel(self.name(), "CUDA"))
        }
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Err(no_kernel(self.name(), "Metal"))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The teacher is a constant of the loss: `None` keeps GradStore from
        // allocating and summing a (N, V) gradient nobody reads.
        if !student.track_op() {
            return Ok((None, None));
        }
        let grad_rows = grad_res.to_dtype(DType::F32)?.contiguous()?; // (N,)
        let op = DivergenceRowsGrad {
            divergence: self.divergence,
            temperature: self.temperature,
        };
        let grad = student.apply_op3_no_bwd(teacher, &grad_rows, &op)?; // (N, V)
        Ok((Some(grad), None))
    }
}

impl CustomOp3 for DivergenceRowsGrad {
    fn name(&self) -> &'static str {
        "distill-divergence-rows-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: l1.shape().clone(),
                rhs: l2.shape().clone(),
                op: self.name(),
            }
            .bt());
        }
        let (rows, v) = rows_and_vocab(l1);
        let grad_rows = f32_slice(s3, l3, self.name())?;
        check_rows(self.name(), "the incoming gradient", grad_rows.len(), rows.elem_count())?;
        let k = Kernel::new(self.divergence, self.temperature);
        let out = with_float_slice!(self.name(), s1, l1, |s| with_float_slice!(self.name(), s2, l2, |t| {
            WithDType::to_cpu_storage_owned(backward_rows(&k, s, t, grad_rows, v))
        }));
        Ok((out, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            cuda::divergence_rows_bwd(self.name(), self.divergence, self.temperature, s1, l1, s2, l2, s3, l3)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s1, l1, s2, l2, s3, l3);
            Err(no_kernel(self.name(), "CUDA"))
        }
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Err(no_kernel(self.name(), "Metal"))
    }
}

impl CustomOp2 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "distill-cross-entropy-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, v) = rows_and_vocab(l1);
        let targets = u32_slice(s2, l2, self.name())?;
        check_rows(self.name(), "the targets", targets.len(), rows.elem_count())?;
        let out = with_float_slice!(self.name(), s1, l1, |s| cross_entropy_fwd(s, targets, v)?);
        Ok((CpuStorage::F32(out), rows))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            cuda::cross_entropy_rows_fwd(self.name(), s1, l1, s2, l2)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s1, l1, s2, l2);
            Err(no_kernel(self.name(), "CUDA"))
        }
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Err(no_kernel(self.name(), "Metal"))
    }

    fn bwd(
        &self,
        student: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !student.track_op() {
            return Ok((None, None));
        }
        let grad_rows = grad_res.to_dtype(DType::F32)?.contiguous()?; // (N,)
        let grad = student.apply_op3_no_bwd(targets, &grad_rows, &CrossEntropyRowsGrad)?; // (N, V)
        Ok((Some(grad), None))
    }
}

impl CustomOp3 for CrossEntropyRowsGrad {
    fn name(&self) -> &'static str {
        "distill-cross-entropy-rows-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, v) = rows_and_vocab(l1);
        let targets = u32_slice(s2, l2, self.name())?;
        let grad_rows = f32_slice(s3, l3, self.name())?;
        check_rows(self.name(), "the targets", targets.len(), rows.elem_count())?;
        check_rows(self.name(), "the incoming gradient", grad_rows.len(), rows.elem_count())?;
        let out = with_float_slice!(self.name(), s1, l1, |s| {
            WithDType::to_cpu_storage_owned(cross_entropy_bwd(s, targets, grad_rows, v))
        });
        Ok((out, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            cuda::cross_entropy_rows_bwd(self.name(), s1, l1, s2, l2, s3, l3)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s1, l1, s2, l2, s3, l3);
            Err(no_kernel(self.name(), "CUDA"))
        }
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Err(no_kernel(self.name(), "Metal"))
    }
}
