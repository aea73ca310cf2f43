//! Launchers for the kernels in kernels/*.cu (feature `cuda`), on candle's
//! CUDA storage and stream. The fatbin built by build.rs is loaded once per
//! CUDA context; launch shapes come from [`crate::plan`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};

use crate::plan::{self, AttentionPlan, HeadLayout, Launch, PlanError, SampleRow};

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/candela.fatbin"));

fn plan_err(e: PlanError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// Kernel `name` of our fatbin in `dev`'s context (module and functions cached).
fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    type Cache = Mutex<HashMap<usize, (Arc<CudaModule>, HashMap<String, CudaFunction>)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    // The cached module holds the context alive, so its address stays unique.
    let key = Arc::as_ptr(ctx) as usize;
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if !cache.contains_key(&key) {
        let module = ctx.load_module(Ptx::from_binary(FATBIN.to_vec())).w()?;
        cache.insert(key, (module, HashMap::new()));
    }
    let Some((module, funcs)) = cache.get_mut(&key) else {
        bail!("candela kernels: module cache lost its entry");
    };
    if let Some(f) = funcs.get(name) {
        return Ok(f.clone());
    }
    let f = module.load_function(name).w()?;
    funcs.insert(name.to_string(), f.clone());
    Ok(f)
}

fn config(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: l.grid,
        block_dim: l.block,
        shared_mem_bytes: 0,
    }
}

fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("candela kernels: dtype {other:?} is not supported (f32, f16 or bf16)"),
    })
}

fn contiguous(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(o) => Ok(o),
        None => bail!("{what} must be contiguous"),
    }
}

/// Host data as a device buffer (never empty: CUDA rejects 0-byte copies).
fn upload<T: DeviceRepr + Copy + Default + 'static>(
    dev: &CudaDevice,
    data: &[T],
) -> Result<CudaSlice<T>> {
    if data.is_empty() {
        dev.clone_htod(&[T::default()][..])
    } else {
        dev.clone_htod(data)
    }
}

// ------------------------------------------------------------------ KV write

/// Copy the rows of `src` (`[n, kv_heads, head_dim]`) into rows `slots`
/// (`[n]`, u32) of `cache` (`[slots, kv_heads, head_dim]`), in place. Slots
/// outside the pool are skipped by the kernel.
pub fn write_rows(
    cache: &mut CudaStorage,
    cache_l: &Layout,
    src: &CudaStorage,
    src_l: &Layout,
    slots: &CudaStorage,
    slots_l: &Layout,
) -> Result<()> {
    let (num_slots, ch, cd) = cache_l.shape().dims3()?;
    let (n, sh, sd) = src_l.shape().dims3()?;
    if (ch, cd) != (sh, sd) {
        bail!("write_kv: cache rows are [{ch}, {cd}], new rows are [{sh}, {sd}]");
    }
    if slots_l.shape().elem_count() != n {
        bail!(
            "write_kv: {n} new rows but {} slots",
            slots_l.shape().elem_count()
        );
    }
    if n == 0 {
        return Ok(());
    }
    let (c0, c1) = contiguous(cache_l, "write_kv: cache")?;
    let (s0, s1) = contiguous(src_l, "write_kv: new keys/values")?;
    let (l0, l1) = contiguous(slots_l, "write_kv: slot mapping")?;
    let dev = cache.device.clone();
    let slots = slots.as_cuda_slice::<u32>()?.slice(l0..l1);
    let row =
        u32::try_from(ch * cd).map_err(|_| candle_core::Error::msg("write_kv: rows too wide"))?;
    let cfg = config(plan::write_rows_launch(n).map_err(plan_err)?);
    let name = format!("candela_write_rows_{}", dtype_name(src.dtype())?);
    let func = function(&dev, &name)?;
    let stream = dev.cuda_stream();
    let num_slots = num_slots as u64;
    macro_rules! launch {
        ($c:expr, $s:expr) => {{
            let mut dst = $c.slice_mut(c0..c1);
            let src = $s.slice(s0..s1);
            let mut b = stream.launch_builder(&func);
            b.arg(&mut dst)
                .arg(&src)
                .arg(&slots)
                .arg(&row)
                .arg(&num_slots);
            // SAFETY: argument types match the kernel's signature; the kernel
            // reads n rows of src and writes only slots < num_slots.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match (&mut cache.slice, &src.slice) {
        (CudaStorageSlice::F32(c), CudaStorageSlice::F32(s)) => launch!(c, s),
        (CudaStorageSlice::F16(c), CudaStorageSlice::F16(s)) => launch!(c, s),
        (CudaStorageSlice::BF16(c), CudaStorageSlice::BF16(s)) => launch!(c, s),
        _ => bail!(
            "write_kv: cache dtype {:?} and new rows dtype {:?} must match (f32, bf16 or f16)",
            cache.dtype(),
            src.dtype()
        ),
    }
    Ok(())
}

// --------------------------------------------------------- paged attention

/// An [`AttentionPlan`] uploaded to one device: made once per forward and
/// shared by every layer's attention.
pub struct DeviceAttentionPlan {
    pub plan: AttentionPlan,
    block_tables: CudaSlice<u32>,
    query_starts: CudaSlice<u32>,
    context_lens: CudaSlice<u32>,
    decode_items: CudaSlice<u32>,
    prefill_tiles: CudaSlice<u32>,
}

impl std::fmt::Debug for DeviceAttentionPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAttentionPlan")
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

impl DeviceAttentionPlan {
    pub fn upload(plan: AttentionPlan, dev: &CudaDevice) -> Result<Self> {
        Ok(Self {
            block_tables: upload(dev, &plan.block_tables)?,
            query_starts: upload(dev, &plan.query_starts)?,
            context_lens: upload(dev, &plan.context_lens)?,
            decode_items: upload(dev, &plan.decode_items)?,
            prefill_tiles: upload(dev, &plan.prefill_tiles)?,
            plan,
        })
    }
}

/// Attention of `q` (`[tokens, heads, head_dim]`) over the paged caches,
/// `[tokens, heads, head_dim]` in q's dtype. The caches must start at offset 0
/// (the pools are whole allocations: 16-byte aligned rows).
pub fn paged_attention(
    q: &CudaStorage,
    q_l: &Layout,
    kc: &CudaStorage,
    kc_l: &Layout,
    vc: &CudaStorage,
    vc_l: &Layout,
    dp: &DeviceAttentionPlan,
    heads: &HeadLayout,
    scale: f32,
) -> Result<CudaStorage> {
    let plan = &dp.plan;
    let (q0, q1) = contiguous(q_l, "paged attention: query")?;
    let (k0, k1) = contiguous(kc_l, "paged attention: key cache")?;
    let (v0, v1) = contiguous(vc_l, "paged attention: value cache")?;
    if k0 != 0 || v0 != 0 {
        bail!("paged attention: the caches must be whole allocations (offset 0)");
    }
    let num_slots = kc_l.shape().dims3()?.0;
    let num_blocks = (num_slots / plan.block_size as usize) as u64;
    let dev = q.device.clone();
    let stream = dev.cuda_stream();
    let tn = dtype_name(q.dtype())?;
    let hd = heads.head_dim;
    let n_out = plan.num_tokens * heads.num_heads * hd;
    let (max_blocks, block_size) = (plan.max_blocks, plan.block_size);
    let (n_heads, n_kv, group) = (
        heads.num_heads as u32,
        heads.num_kv_heads as u32,
        heads.group as u32,
    );
    let (head_chunks, max_parts) = (heads.head_chunks as u32, plan.max_partitions);
    let decode = plan.decode_launch(heads).map_err(plan_err)?;
    let reduce = plan.decode_reduce_launch(heads).map_err(plan_err)?;
    let prefill = plan.prefill_launch(heads).map_err(plan_err)?;
    let (part_len, ml_len) = plan.decode_partial_lens(heads);
    let mut part_out = dev.alloc_zeros::<f32>(part_len.max(1))?;
    let mut part_ml = dev.alloc_zeros::<f32>(ml_len.max(1))?;

    macro_rules! run {
        ($t:ty, $q:expr, $k:expr, $v:expr) => {{
            let qv = $q.slice(q0..q1);
            let kv = $k.slice(k0..k1);
            let vv = $v.slice(v0..v1);
            let mut out = dev.alloc_zeros::<$t>(n_out.max(1))?;
            if let Some(l) = decode {
                let func = function(&dev, &format!("candela_decode_{tn}_{hd}"))?;
                let mut b = stream.launch_builder(&func);
                b.arg(&mut out).arg(&mut part_out).arg(&mut part_ml);
                b.arg(&qv)
                    .arg(&kv)
                    .arg(&vv)
                    .arg(&dp.decode_items)
                    .arg(&dp.block_tables);
                b.arg(&max_blocks)
                    .arg(&block_size)
                    .arg(&num_blocks)
                    .arg(&n_heads)
                    .arg(&n_kv);
                b.arg(&group).arg(&head_chunks).arg(&max_parts).arg(&scale);
                // SAFETY: argument types match the kernel; the plan's arrays
                // index only within the batch and the tables within the pool.
                unsafe { b.launch(config(l)) }.w()?;
            }
            if let Some(l) = reduce {
                let func = function(&dev, &format!("candela_decode_reduce_{tn}_{hd}"))?;
                let mut b = stream.launch_builder(&func);
                b.arg(&mut out)
                    .arg(&part_out)
                    .arg(&part_ml)
                    .arg(&dp.decode_items);
                b.arg(&n_heads).arg(&max_parts);
                // SAFETY: as above; the partials were sized by decode_partial_lens.
                unsafe { b.launch(config(l)) }.w()?;
            }
            if let Some(l) = prefill {
                let func = function(&dev, &format!("candela_prefill_{tn}_{hd}"))?;
                let mut b = stream.launch_builder(&func);
                b.arg(&mut out)
                    .arg(&qv)
                    .arg(&kv)
                    .arg(&vv)
                    .arg(&dp.prefill_tiles);
                b.arg(&dp.query_starts)
                    .arg(&dp.context_lens)
                    .arg(&dp.block_tables);
                b.arg(&max_blocks)
                    .arg(&block_size)
                    .arg(&num_blocks)
                    .arg(&n_heads)
                    .arg(&n_kv);
                b.arg(&group).arg(&scale);
                // SAFETY: as above.
                unsafe { b.launch(config(l)) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match (&q.slice, &kc.slice, &vc.slice) {
        (CudaStorageSlice::F32(q), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
            run!(f32, q, k, v)
        }
        (CudaStorageSlice::F16(q), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
            run!(half::f16, q, k, v)
        }
        (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
            run!(half::bf16, q, k, v)
        }
        _ => bail!(
            "paged attention: query/key/value dtypes {:?}/{:?}/{:?} must match (f32, bf16 or f16)",
            q.dtype(),
            kc.dtype(),
            vc.dtype()
        ),
    })
}

// ----------------------------------------------------------------- sampling

/// Sample one token per entry of `rows` from `logits` (`[rows, vocab]` f32 on
/// a CUDA device); only the chosen ids come back to the host.
pub fn sample(logits: &Tensor, rows: &[SampleRow]) -> Result<Vec<u32>> {
    let (num_rows, vocab) = logits.dims2()?;
    if logits.dtype() != DType::F32 {
        bail!("GPU sampling needs f32 logits, got {:?}", logits.dtype());
    }
    let sp = plan::plan_sampling(rows, num_rows, vocab).map_err(plan_err)?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let (storage, layout) = logits.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("GPU sampling needs logits on a CUDA device");
    };
    let (o0, o1) = contiguous(layout, "GPU sampling: logits")?;
    let dev = cs.device.clone();
    let x = cs.as_cuda_slice::<f32>()?.slice(o0..o1);
    let params_u = dev.clone_htod(&sp.params_u[..])?;
    let params_f = dev.clone_htod(&sp.params_f[..])?;
    let mut out = dev.alloc_zeros::<u32>(rows.len())?;
    let func = function(&dev, "candela_sample")?;
    let stream = dev.cuda_stream();
    let (row_stride, vocab) = (vocab as u64, vocab as u32);
    let mut b = stream.launch_builder(&func);
    b.arg(&mut out)
        .arg(&x)
        .arg(&row_stride)
        .arg(&vocab)
        .arg(&params_u)
        .arg(&params_f);
    // SAFETY: argument types match the kernel; rows were checked against the matrix.
    unsafe { b.launch(config(sp.launch)) }.w()?;
    dev.clone_dtoh(&out)
}

/// Free and total memory of `dev` in bytes.
pub fn memory_info(dev: &CudaDevice) -> Result<(usize, usize)> {
    dev.cuda_stream().context().mem_get_info().w()
}
