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
fn padded_bytes<T>(len: usize) -> u64 {
    let bytes = (len * std::mem::size_of::<T>()) as u64;
    bytes.max(4).div_ceil(4) * 4
}

impl<T: Pod> GpuBuffer<T> {
    /// A zero-filled buffer of `len` elements.
    pub fn zeros(ctx: &GpuContext, label: &str, len: usize) -> Result<Self> {
        let size = padded_bytes::<T>(len);
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
        let size = padded_bytes::<T>(data.len());
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

    /// Writes `data` at element offset `at` (queued; lands before the next submission).
    pub fn write(&self, ctx: &GpuContext, at: usize, data: &[T]) {
        assert!(
            at + data.len() <= self.len,
            "write to {}: {} elements at {} overflow its {} elements",
            self.label,
            data.len(),
            at,
            self.len
        );
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.is_empty() {
            return;
        }
        let off = (at * std::mem::size_of::<T>()) as u64;
        assert!(
            off.is_multiple_of(4) && bytes.len().is_multiple_of(4),
            "write to {}: byte offset {off} and length {} must be multiples of 4",
            self.label,
            bytes.len()
        );
        ctx.queue.write_buffer(&self.buffer, off, bytes);
    }

    /// A recorded copy of `n` elements from `at` into `dst` at `dst_at`.
    pub fn copy_op(&self, at: usize, dst: &GpuBuffer<T>, dst_at: usize, n: usize) -> super::Op {
        assert!(
            at + n <= self.len && dst_at + n <= dst.len,
            "copy {} -> {}: {n} elements from {at} to {dst_at} overflow {} / {}",
            self.label,
            dst.label,
            self.len,
            dst.len
        );
        let size = std::mem::size_of::<T>() as u64;
        super::Op::Copy(super::BufferCopy {
            src: self.buffer.clone(),
            src_offset: at as u64 * size,
            dst: dst.buffer.clone(),
            dst_offset: dst_at as u64 * size,
            size: n as u64 * size,
        })
    }

    /// Copies the whole buffer back to the host (waits for the GPU).
    pub fn read(&self, ctx: &GpuContext) -> Result<Vec<T>> {
        let n = self.len * std::mem::size_of::<T>();
        let bytes = read_bytes(
            ctx,
            &self.buffer,
            &self.label,
            0,
            padded_bytes::<T>(self.len),
        )?;
        Ok(bytemuck::pod_collect_to_vec(&bytes[..n]))
    }

    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        self.buffer.as_entire_binding()
    }
}

/// Creates a storage buffer of `size` bytes whose first bytes are `data`,
/// written through a mapping at creation (no staging copy).
pub fn create_init(ctx: &GpuContext, label: &str, size: u64, data: &[u8]) -> Result<wgpu::Buffer> {
    assert!(
        data.len() as u64 <= size,
        "create_init {label}: {} bytes of data into a {size}-byte buffer",
        data.len()
    );
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
    assert!(
        size.is_multiple_of(4),
        "create_with {label}: size {size} is not a multiple of 4"
    );
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

/// Copies `len` bytes at `offset` of `buffer` back to the host through a staging buffer.
pub fn read_bytes(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    label: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
    let staging = ctx.checked(label, || {
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kvsift.readback"),
            size: len,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("kvsift.readback"),
            });
        enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, len);
        ctx.queue.submit([enc.finish()]);
        staging
    })?;
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    ctx.wait_idle()?;
    let mapped = rx
        .recv()
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(message) = mapped {
        return Err(Error::Readback {
            label: label.to_string(),
            message,
        });
    }
    let out = staging.get_mapped_range(..).map_err(|e| Error::Readback {
        label: label.to_string(),
        message: e.to_string(),
    })?;
    let v = out.to_vec();
    drop(out);
    staging.unmap();
    Ok(v)
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
    pub fn copy_from(&self, src: &wgpu::Buffer, offset: u64, bytes: u64) -> super::Op {
        self.copy_from_to(src, offset, bytes, 0)
    }

    /// The same, into the slot at byte `dst_offset`.
    pub fn copy_from_to(
        &self,
        src: &wgpu::Buffer,
        offset: u64,
        bytes: u64,
        dst_offset: u64,
    ) -> super::Op {
        assert!(
            dst_offset + bytes <= self.staging.size(),
            "readback {}: {bytes} bytes at {dst_offset} into a {}-byte slot",
            self.label,
            self.staging.size()
        );
        super::Op::Copy(super::BufferCopy {
            src: src.clone(),
            src_offset: offset,
            dst: self.staging.clone(),
            dst_offset,
            size: bytes,
        })
    }

    /// Waits for the GPU and returns the first `count` values of the slot.
    pub fn read<T: Pod>(&self, ctx: &GpuContext, count: usize) -> Result<Vec<T>> {
        let bytes = (count * std::mem::size_of::<T>()) as u64;
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
    pub fn write(&self, ctx: &GpuContext, step: usize, data: &[T]) {
        assert!(
            data.len() <= self.len,
            "staged input: {} > {}",
            data.len(),
            self.len
        );
        self.stage.write(ctx, step * self.len, data);
    }

    /// Copies step `step`'s first `n` values into `live`.
    pub fn copy_op(&self, step: usize, live: &GpuBuffer<T>, n: usize) -> super::Op {
        assert!(n <= self.len, "staged input: copy of {n} > {}", self.len);
        self.stage.copy_op(step * self.len, live, 0, n)
    }
}
