//! Typed storage buffers with upload and readback.

use std::marker::PhantomData;

use bytemuck::Pod;

use super::GpuContext;
use crate::error::{Error, Result};

/// Usage every kvsift storage buffer gets: bindable, copyable both ways.
pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// A storage buffer holding `len` elements of `T`.
pub struct GpuBuffer<T: Pod> {
    buffer: wgpu::Buffer,
    len: usize,
    label: String,
    _elem: PhantomData<T>,
}

/// Bytes actually allocated for `len` elements: at least 4 and a multiple of 4
/// (copies need 4-byte sizes; zero-sized bindings are invalid).
fn padded_bytes<T>(label: &str, len: usize) -> Result<u64> {
    let bytes = len
        .checked_mul(std::mem::size_of::<T>())
        .and_then(|b| u64::try_from(b).ok())
        .and_then(|b| b.max(4).checked_next_multiple_of(4))
        .ok_or_else(|| too_large(label, len as u64))?;
    Ok(bytes)
}

fn too_large(what: &str, requested: u64) -> Error {
    Error::LimitExceeded {
        what: format!("buffer {what:?}"),
        requested,
        limit_name: "the address space (usize)",
        limit: usize::MAX as u64,
    }
}

/// The product of `dims` (a buffer's element count), or a clear error if
/// it overflows: sizes derived from flags and configs are checked, never wrapped.
pub fn checked_len(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::LimitExceeded {
            what: format!("{what} ({dims:?} elements)"),
            requested: u64::MAX,
            limit_name: "the address space (usize)",
            limit: usize::MAX as u64,
        })
}

impl<T: Pod> GpuBuffer<T> {
    /// A zero-filled buffer of `len` elements.
    pub fn zeros(ctx: &GpuContext, label: &str, len: usize) -> Result<Self> {
        let size = padded_bytes::<T>(label, len)?;
        check_size(ctx, label, size)?;
        let buffer = ctx.checked(label, || {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: STORAGE,
                mapped_at_creation: false,
            })
        })?;
        Ok(Self {
            buffer,
            len,
            label: label.to_string(),
            _elem: PhantomData,
        })
    }

    /// A buffer initialised with `data` (written through a mapping, no staging copy).
    pub fn from_slice(ctx: &GpuContext, label: &str, data: &[T]) -> Result<Self> {
        let size = padded_bytes::<T>(label, data.len())?;
        let buffer = create_init(ctx, label, size, bytemuck::cast_slice(data))?;
        Ok(Self {
            buffer,
            len: data.len(),
            label: label.to_string(),
            _elem: PhantomData,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn raw(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    pub fn size_bytes(&self) -> u64 {
        self.buffer.size()
    }

    /// Elements `at..at + n`, or an error naming the buffer if they are not all in it.
    fn range(&self, at: usize, n: usize) -> Result<std::ops::Range<usize>> {
        match at.checked_add(n) {
            Some(end) if end <= self.len => Ok(at..end),
            _ => Err(Error::invalid(
                format!("buffer {:?}", self.label),
                format!("{n} elements at {at} overflow its {} elements", self.len),
            )),
        }
    }

    /// Writes `data` at element offset `at` (queued; lands before the next submission).
    pub fn write(&self, ctx: &GpuContext, at: usize, data: &[T]) -> Result<()> {
        self.range(at, data.len())?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.is_empty() {
            return Ok(());
        }
        let off = (at * std::mem::size_of::<T>()) as u64;
        if !(off.is_multiple_of(4) && bytes.len().is_multiple_of(4)) {
            return Err(Error::invalid(
                format!("buffer {:?}", self.label),
                format!(
                    "write of {} bytes at byte {off}: both must be multiples of 4",
                    bytes.len()
                ),
            ));
        }
        ctx.queue.write_buffer(&self.buffer, off, bytes);
        Ok(())
    }

    /// A recorded copy of `n` elements from `at` into `dst` at `dst_at`.
    pub fn copy_op(
        &self,
        at: usize,
        dst: &GpuBuffer<T>,
        dst_at: usize,
        n: usize,
    ) -> Result<super::Op> {
        self.range(at, n)?;
        dst.range(dst_at, n)?;
        let size = std::mem::size_of::<T>() as u64;
        Ok(super::Op::Copy(super::BufferCopy {
            src: self.buffer.clone(),
            src_offset: at as u64 * size,
            dst: dst.buffer.clone(),
            dst_offset: dst_at as u64 * size,
            size: n as u64 * size,
        }))
    }

    /// Copies the whole buffer back to the host (waits for the GPU).
    pub fn read(&self, ctx: &GpuContext) -> Result<Vec<T>> {
        self.read_range(ctx, 0, self.len)
    }

    /// Copies elements `at..at + n` back to the host (waits for the GPU).
    pub fn read_range(&self, ctx: &GpuContext, at: usize, n: usize) -> Result<Vec<T>> {
        let r = self.range(at, n)?;
        let size = std::mem::size_of::<T>();
        let (start, end) = ((r.start * size) as u64, (r.end * size) as u64);
        // Copies move whole 4-byte words.
        let (lo, hi) = (start / 4 * 4, end.div_ceil(4) * 4);
        if hi == lo {
            return Ok(vec![]);
        }
        let bytes = read_bytes(ctx, &self.buffer, &self.label, lo, hi - lo)?;
        let skip = (start - lo) as usize;
        Ok(bytemuck::pod_collect_to_vec(&bytes[skip..skip + n * size]))
    }

    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        self.buffer.as_entire_binding()
    }
}

/// Creates a storage buffer of `size` bytes whose first bytes are `data`,
/// written through a mapping at creation (no staging copy).
pub fn create_init(ctx: &GpuContext, label: &str, size: u64, data: &[u8]) -> Result<wgpu::Buffer> {
    if data.len() as u64 > size {
        return Err(Error::invalid(
            format!("buffer {label:?}"),
            format!("{} bytes of data into {size} bytes", data.len()),
        ));
    }
    create_with(ctx, label, size, |view| {
        view.slice(..data.len()).copy_from_slice(data)
    })
}

/// Creates a storage buffer of `size` bytes (a multiple of 4) mapped at
/// creation, lets `fill` write into the mapping, then unmaps it.
pub fn create_with(
    ctx: &GpuContext,
    label: &str,
    size: u64,
    fill: impl FnOnce(&mut wgpu::BufferViewMut),
) -> Result<wgpu::Buffer> {
    if !size.is_multiple_of(4) {
        return Err(Error::invalid(
            format!("buffer {label:?}"),
            format!("size {size} is not a multiple of 4"),
        ));
    }
    check_size(ctx, label, size)?;
    let buffer = ctx.checked(label, || {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: STORAGE,
            mapped_at_creation: true,
        })
    })?;
    {
        let mut view = buffer.get_mapped_range_mut(..).map_err(|e| Error::Gpu {
            during: format!("mapping {label} for upload"),
            message: e.to_string(),
        })?;
        fill(&mut view);
    }
    buffer.unmap();
    Ok(buffer)
}

fn check_size(ctx: &GpuContext, label: &str, size: u64) -> Result<()> {
    if size > ctx.caps.max_buffer_bytes {
        return Err(Error::LimitExceeded {
            what: format!("buffer {label:?}"),
            requested: size,
            limit_name: "max_buffer_size",
            limit: ctx.caps.max_buffer_bytes,
        });
    }
    Ok(())
}

/// Copies byte ranges `(buffer, offset, len)` back to the host, concatenated,
/// in as few submissions as staging buffers of at most 256 MiB allow (each
/// range's offset and length multiples of 4).
pub fn read_ranges(
    ctx: &GpuContext,
    label: &str,
    ranges: &[(&wgpu::Buffer, u64, u64)],
) -> Result<Vec<u8>> {
    const STAGING_MAX: u64 = 256 << 20;
    let limit = STAGING_MAX.min(ctx.caps.max_buffer_bytes);
    let total: u64 = ranges.iter().map(|r| r.2).sum();
    let mut out = Vec::with_capacity(total as usize);
    let mut i = 0;
    while i < ranges.len() {
        // One staging buffer for the ranges that fit (at least one).
        let mut size = 0;
        let mut j = i;
        while j < ranges.len() && (j == i || size + ranges[j].2 <= limit) {
            size += ranges[j].2;
            j += 1;
        }
        let group = &ranges[i..j];
        let staging = ctx.checked(label, || {
            let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kvsift.readback"),
                size: size.max(4),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = ctx.encoder("kvsift.readback");
            let mut at = 0;
            for (buffer, offset, len) in group {
                enc.copy_buffer_to_buffer(buffer, *offset, &staging, at, *len);
                at += len;
            }
            ctx.queue.submit([enc.finish()]);
            staging
        })?;
        out.extend(map_read(ctx, &staging, label, size)?);
        i = j;
    }
    Ok(out)
}

/// Maps a filled staging buffer and copies its first `len` bytes out.
fn map_read(ctx: &GpuContext, staging: &wgpu::Buffer, label: &str, len: u64) -> Result<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    ctx.wait_idle()?;
    let fail = |message: String| Error::Readback {
        label: label.to_string(),
        message,
    };
    rx.recv()
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(e.to_string()))?;
    let out = staging
        .get_mapped_range(..)
        .map_err(|e| fail(e.to_string()))?;
    let v = out[..len as usize].to_vec();
    drop(out);
    staging.unmap();
    Ok(v)
}

/// Copies `len` bytes at `offset` of `buffer` back to the host through a staging buffer.
pub fn read_bytes(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    label: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
    read_ranges(ctx, label, &[(buffer, offset, len)])
}

/// A preallocated host-readable buffer for the small result of a step (the
/// sampled token, a row of logits): the step's last op copies into it, then
/// [`ReadbackSlot::read`] maps it. No allocation per step.
pub struct ReadbackSlot {
    staging: wgpu::Buffer,
    label: String,
}

impl ReadbackSlot {
    pub fn new(ctx: &GpuContext, label: &str, bytes: u64) -> Result<Self> {
        let size = bytes.max(4).div_ceil(4) * 4;
        let staging = ctx.checked(label, || {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })?;
        Ok(Self {
            staging,
            label: label.to_string(),
        })
    }

    /// The op that copies `bytes` at `offset` of `src` into this slot.
    pub fn copy_from(&self, src: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<super::Op> {
        self.copy_from_to(src, offset, bytes, 0)
    }

    /// The same, into the slot at byte `dst_offset`.
    pub fn copy_from_to(
        &self,
        src: &wgpu::Buffer,
        offset: u64,
        bytes: u64,
        dst_offset: u64,
    ) -> Result<super::Op> {
        if dst_offset
            .checked_add(bytes)
            .is_none_or(|end| end > self.staging.size())
        {
            return Err(Error::invalid(
                format!("readback {:?}", self.label),
                format!(
                    "{bytes} bytes at {dst_offset} into a {}-byte slot",
                    self.staging.size()
                ),
            ));
        }
        Ok(super::Op::Copy(super::BufferCopy {
            src: src.clone(),
            src_offset: offset,
            dst: self.staging.clone(),
            dst_offset,
            size: bytes,
        }))
    }

    /// Waits for the GPU and returns the first `count` values of the slot.
    pub fn read<T: Pod>(&self, ctx: &GpuContext, count: usize) -> Result<Vec<T>> {
        let bytes = (count * std::mem::size_of::<T>()) as u64;
        if bytes > self.staging.size() {
            return Err(Error::invalid(
                format!("readback {:?}", self.label),
                format!(
                    "{bytes} bytes read from a {}-byte slot",
                    self.staging.size()
                ),
            ));
        }
        let span = bytes.div_ceil(4) * 4;
        let (tx, rx) = std::sync::mpsc::channel();
        self.staging
            .map_async(wgpu::MapMode::Read, 0..span, move |r| {
                let _ = tx.send(r);
            });
        ctx.wait_idle()?;
        let fail = |message: String| Error::Readback {
            label: self.label.clone(),
            message,
        };
        rx.recv()
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))?;
        let out = {
            let view = self
                .staging
                .get_mapped_range(0..span)
                .map_err(|e| fail(e.to_string()))?;
            bytemuck::pod_collect_to_vec(&view[..bytes as usize])
        };
        self.staging.unmap();
        Ok(out)
    }
}

/// The per-step inputs of a chained decode (several decode steps in one
/// submission): `steps` copies of an input buffer's first `len` elements,
/// written on the host before the submission and copied into the live
/// buffer ahead of each step, so the recorded step itself never changes.
pub struct StagedInput<T: Pod> {
    stage: GpuBuffer<T>,
    len: usize,
}

impl<T: Pod> StagedInput<T> {
    pub fn new(ctx: &GpuContext, label: &str, steps: usize, len: usize) -> Result<Self> {
        Ok(Self {
            stage: GpuBuffer::zeros(ctx, label, steps.max(1) * len)?,
            len,
        })
    }

    /// Step `step`'s values (at most `len`).
    pub fn write(&self, ctx: &GpuContext, step: usize, data: &[T]) -> Result<()> {
        self.check(data.len())?;
        self.stage.write(ctx, step * self.len, data)
    }

    /// Copies step `step`'s first `n` values into `live`.
    pub fn copy_op(&self, step: usize, live: &GpuBuffer<T>, n: usize) -> Result<super::Op> {
        self.check(n)?;
        self.stage.copy_op(step * self.len, live, 0, n)
    }

    fn check(&self, n: usize) -> Result<()> {
        if n > self.len {
            return Err(Error::invalid(
                format!("staged input {:?}", self.stage.label()),
                format!("{n} values, room for {} per step", self.len),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::gpu;

    #[test]
    fn out_of_range_writes_copies_and_reads_are_errors() {
        let Some(ctx) = gpu() else { return };
        let a = GpuBuffer::from_slice(ctx, "test.a", &[1u32, 2, 3, 4, 5]).unwrap();
        let b = GpuBuffer::<u32>::zeros(ctx, "test.b", 3).unwrap();
        for e in [
            a.write(ctx, 4, &[9, 9]).unwrap_err(),
            a.write(ctx, usize::MAX, &[9]).unwrap_err(),
            a.copy_op(3, &b, 0, 3).err().unwrap(),
            a.copy_op(0, &b, 1, 3).err().unwrap(),
            a.read_range(ctx, 2, 4).unwrap_err(),
        ] {
            assert!(e.to_string().contains("overflow"), "{e}");
        }
        assert!(GpuBuffer::<u32>::zeros(ctx, "test.huge", usize::MAX).is_err());
        assert!(checked_len("x", &[usize::MAX, 2]).is_err());
        // In range: reads of a part, and the whole.
        a.write(ctx, 1, &[7, 8]).unwrap();
        assert_eq!(a.read_range(ctx, 1, 3).unwrap(), vec![7, 8, 4]);
        assert_eq!(a.read(ctx).unwrap(), vec![1, 7, 8, 4, 5]);
        let slot = ReadbackSlot::new(ctx, "test.slot", 8).unwrap();
        assert!(slot.copy_from(a.raw(), 0, 12).is_err());
        assert!(slot.read::<u32>(ctx, 3).is_err());
    }
}
