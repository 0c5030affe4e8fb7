//! Tile products for the fused kernels: strided read-only views (`Mat`), a task's
//! writable window of a shared output (`Dst`, `SharedOut`), and one single-threaded
//! `gemm` call on them (`matmul`), whose summation order the sizes and strides alone fix.
//! The `unsafe` of writing disjoint rows of one buffer from several tasks lives here.

use std::marker::PhantomData;

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major rows `rs` apart.
    pub(crate) fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    /// The transpose, as a view of the same data.
    pub(crate) fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether an (rows, cols) matrix fits in `data`.
    pub(crate) fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// Where a tile product writes: element (i, j) at `ptr + i * rs + j`, of which the first
/// `len` elements may be written by the holder.
pub(crate) struct Dst<'a> {
    ptr: *mut f32,
    len: usize,
    rs: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

impl<'a> Dst<'a> {
    /// A task's own buffer, rows `rs` apart.
    pub(crate) fn slice(data: &'a mut [f32], rs: usize) -> Self {
        Self {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            rs,
            _borrow: PhantomData,
        }
    }
}

/// An output buffer that the parallel tasks write through raw pointers, each in its own
/// interleaved set of rows: in (B, T, heads, D), head `h` of batch `b` is T rows of D
/// floats, heads * D apart, and belongs to one task. Slices cannot express that
/// partition (the rows of one head sit between those of the others), pointers can.
pub(crate) struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: the buffer is only written through `rows`, whose callers promise that no two
// tasks write (or read) the same element; the mutable borrow is held for 'a.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub(crate) fn new(data: &'a mut [f32]) -> Self {
        Self {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            _borrow: PhantomData,
        }
    }

    /// The rows starting at element `start`, `rs` apart.
    ///
    /// # Safety
    ///
    /// While the returned `Dst` is used, no other thread may access the elements it
    /// writes (`matmul` writes the first `n` of each of its `m` rows).
    pub(crate) unsafe fn rows(&self, start: usize, rs: usize) -> Dst<'_> {
        assert!(start <= self.len, "output offset out of bounds");
        Dst {
            // SAFETY: `start <= len`, so the pointer stays inside (or one past) the buffer.
            ptr: unsafe { self.ptr.add(start) },
            len: self.len - start,
            rs,
            _borrow: PhantomData,
        }
    }
}

/// dst (m, n) <- [dst +] beta * lhs (m, kd) @ rhs (kd, n), on this thread, with the `gemm`
/// crate's kernels (its summation order is fixed by the sizes and strides alone).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(m: usize, n: usize, kd: usize, dst: Dst, accumulate: bool, lhs: Mat, rhs: Mat, beta: f32) {
    if m == 0 || n == 0 {
        return;
    }
    // Internal invariants (the callers derive every size from the checked dims); they
    // make the unsafe call below sound, so they are checked in release builds too.
    assert!(
        lhs.covers(m, kd) && rhs.covers(kd, n) && dst.rs >= n && (m - 1) * dst.rs + n <= dst.len,
        "tile product out of bounds"
    );
    // SAFETY: the assert keeps every element gemm reads (lhs, rhs) or writes (dst) inside
    // its buffer; dst is writable by this task alone (`Dst`), so it aliases no input.
    unsafe {
        gemm::gemm(
            m,
            n,
            kd,
            dst.ptr,
            1,
            dst.rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
