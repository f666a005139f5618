//! AdamW8bit as `bitsandbytes.optim.AdamW8bit` runs on CUDA (kohya's `AdamW8bit`;
//! bitsandbytes 0.50, kernel `kOptimizerStatic8bit2StateBlockwise`): both moments stored
//! as one byte per element, codes into bnb's dynamic maps (signed for the first moment,
//! unsigned for the second) scaled by the absolute maximum of each block of 256 elements.
//! Each update dequantizes a block, updates the moments in f32, takes the Adam step from
//! those unrounded moments (`p += -lr * sqrt(1-b2^t) / (1-b1^t) * m / (sqrt(v) + eps *
//! sqrt(1-b2^t))`), then decays the weight (`p *= 1 - lr * wd`, after the step as the
//! kernel does), and stores the moments again by nearest code against the new block
//! maxima, the first moment's code moved one step if rounding flipped its sign. Elements
//! with a NaN or infinite gradient get zero moments and keep their value. Parameters with
//! fewer than `min_8bit_size` (4096) elements keep f32 moments and take the same update
//! (bnb's 32-bit kernel). The 8-bit moments live on the CPU (2 bytes per element plus 8
//! per block), whatever the parameters' device.

use super::Optimizer;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// Elements per block (bnb's `BLOCKSIZE_2STATE`).
pub(super) const BLOCK: usize = 256;

/// bnb's `create_dynamic_map(signed)` (8 bits, 7 exponent bits): for each decade
/// 1e-6..1 the midpoints of a linear grid over [0.1, 1] (2^i cells, twice as many when
/// unsigned), mirrored when signed, with 0 and 1, sorted. Computed in f32 as torch does
/// (`linspace` fills the first half from the start, the rest from the end, by fused
/// multiply-add), so the values are bnb's to the bit.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    const DECADES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, scale) in DECADES.iter().enumerate() {
        let n = if signed {
            (1 << i) + 1
        } else {
            (1 << (i + 1)) + 1
        };
        let (start, end) = (0.1f32, 1.0f32);
        let step = (end - start) / (n - 1) as f32;
        let grid: Vec<f32> = (0..n)
            .map(|k| {
                if k < n / 2 {
                    step.mul_add(k as f32, start)
                } else {
                    (-step).mul_add((n - 1 - k) as f32, end)
                }
            })
            .collect();
        for w in grid.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(*scale as f32 * mean);
            if signed {
                data.push(-(*scale as f32) * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// A dynamic map with what makes [`Codes::quantize`] fast: where the kernel's binary search
/// ends for each count of codes below the input, and a table from the input's float bits
/// to a lower bound of that count.
struct Codes {
    /// The map, then `SCAN` times +inf (what the scan past the last code compares with).
    code: [f32; 256 + SCAN],
    /// Indexed by `r`, the number of codes below the input: the search's end.
    paths: [Path; 257],
    /// Indexed by [`bucket`]: the least `r` of any input in the bucket.
    start: Vec<u16>,
}

/// Where the kernel's search ends: its pivot, the last pivots it passed on either side and
/// their values (the initial bounds, -1 or 0 and 1, where it never moved that way).
#[derive(Clone, Copy, Default)]
struct Path {
    pivot: u8,
    upper_pivot: u8,
    lower_pivot: u8,
    upper: f32,
    lower: f32,
}

/// Binades of |x| from 2^(LOW_EXP - 127) up to [1, 2), each cut into 2^SUB_BITS buckets;
/// smaller magnitudes, and 2 and above, one bucket each per sign. Every code's magnitude
/// (3.25e-7 ..= 1) lies inside the cut binades.
const LOW_EXP: u32 = 127 - 24;
const SUB_BITS: u32 = 7;
const LEVELS: u32 = 127 - LOW_EXP + 3;
/// The most codes any bucket holds (checked when the table is built): the scan from the
/// bucket's lower bound takes this many branch-free steps.
const SCAN: usize = 2;

/// The bucket of a non-NaN float: sign, binade (or the tiny / huge level), top mantissa bits.
fn bucket(x: f32) -> usize {
    let bits = x.to_bits();
    let (sign, mag) = (bits >> 31, bits & 0x7fff_ffff);
    let exp = mag >> 23;
    let (level, sub) = if exp < LOW_EXP {
        (0, 0)
    } else if exp > 127 {
        (LEVELS - 1, 0)
    } else {
        (
            exp - LOW_EXP + 1,
            (mag >> (23 - SUB_BITS)) & ((1 << SUB_BITS) - 1),
        )
    };
    (((sign * LEVELS + level) << SUB_BITS) | sub) as usize
}

impl Codes {
    fn new(signed: bool) -> Self {
        let map = dynamic_map(signed);
        let below = |x: f32| map.iter().filter(|&&c| c < x).count();
        let mut paths = [Path::default(); 257];
        for (r, path) in paths.iter_mut().enumerate() {
            // The kernel's loop with `x > code[pivot]` replaced by `pivot < r`: the same
            // branch for every input with `r` codes below it, the map being sorted.
            let mut pivot = 127usize;
            let (mut upper_pivot, mut lower_pivot) = (255usize, 0usize);
            let mut lower = if signed { -1.0f32 } else { 0.0 };
            let mut upper = 1.0f32;
            let mut i = 64;
            while i > 0 {
                if pivot < r {
                    lower_pivot = pivot;
                    lower = map[pivot];
                    pivot += i;
                } else {
                    upper_pivot = pivot;
                    upper = map[pivot];
                    pivot -= i;
                }
                i >>= 1;
            }
            *path = Path {
                pivot: pivot as u8,
                upper_pivot: upper_pivot as u8,
                lower_pivot: lower_pivot as u8,
                upper,
                lower,
            };
        }
        // The least member of each bucket: the bottom of a positive bucket, the top
        // magnitude of a negative one; +0 and -2^-24 for the tiny ones, 2 and -inf for the
        // huge ones. (Its greatest, the other way round, bounds the codes it holds.)
        let sub_ulps = 1u32 << (23 - SUB_BITS);
        let mut start = vec![0u16; (2 * LEVELS as usize) << SUB_BITS];
        for sign in 0..2u32 {
            for level in 0..LEVELS {
                for sub in 0..1u32 << SUB_BITS {
                    let bottom =
                        |l: u32| f32::from_bits(((l - 1 + LOW_EXP) << 23) | (sub * sub_ulps));
                    let top = |l: u32| {
                        f32::from_bits(((l - 1 + LOW_EXP) << 23) | (sub * sub_ulps + sub_ulps - 1))
                    };
                    let (least, greatest) = match (sign, level) {
                        (0, 0) => (0.0, f32::from_bits((LOW_EXP << 23) - 1)),
                        (1, 0) => (-f32::from_bits(LOW_EXP << 23), -0.0),
                        (0, l) if l == LEVELS - 1 => (2.0, f32::INFINITY),
                        (1, l) if l == LEVELS - 1 => (f32::NEG_INFINITY, -2.0),
                        (0, l) => (bottom(l), top(l)),
                        (_, l) => (-top(l), -bottom(l)),
                    };
                    let (lo, hi) = (below(least), below(greatest) + 1);
                    assert!(hi - lo <= SCAN, "a bucket holds more than {SCAN} codes");
                    start[(((sign * LEVELS + level) << SUB_BITS) | sub) as usize] = lo as u16;
                }
            }
        }
        let mut code = [f32::INFINITY; 256 + SCAN];
        code[..256].copy_from_slice(&map);
        Self { code, paths, start }
    }

    /// The kernel's `quantize_2D`: a binary search over the sorted map, then the nearer of
    /// the two neighbours it ended between by their midpoint (the search starts between -1
    /// or 0 and 1). Computed from the number of codes below `x` (the bucket's lower bound,
    /// then the few codes above it), which fixes every branch of the search.
    #[inline]
    fn quantize(&self, x: f32) -> u8 {
        // Branch-free throughout: the inputs are noise to a branch predictor.
        let r = self.start[bucket(x)] as usize;
        let mut r = if x.is_nan() { 0 } else { r };
        for _ in 0..SCAN {
            r += (self.code[r] < x) as usize;
        }
        let p = self.paths[r];
        let val = self.code[p.pivot as usize];
        let above = if x > (p.upper + val) * 0.5 {
            p.upper_pivot
        } else {
            p.pivot
        };
        let below = if x < (p.lower + val) * 0.5 {
            p.lower_pivot
        } else {
            p.pivot
        };
        if x > val { above } else { below }
    }
}

fn maps() -> &'static (Codes, Codes) {
    static MAPS: OnceLock<(Codes, Codes)> = OnceLock::new();
    MAPS.get_or_init(|| (Codes::new(true), Codes::new(false)))
}

/// The kernel's `quantize_2D` as written: the reference for [`Codes::quantize`].
#[cfg(test)]
fn quantize_search(code: &[f32; 256], signed: bool, x: f32) -> u8 {
    let mut pivot = 127usize;
    let (mut upper_pivot, mut lower_pivot) = (255usize, 0usize);
    let mut lower = if signed { -1.0f32 } else { 0.0 };
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    let pick = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    pick as u8
}

/// One parameter's 8-bit moments: codes per element, absolute maximum per block.
pub(super) struct Quantized {
    m: Vec<u8>,
    v: Vec<u8>,
    absmax_m: Vec<f32>,
    absmax_v: Vec<f32>,
}

impl Quantized {
    fn zeros(n: usize) -> Self {
        let blocks = n.div_ceil(BLOCK);
        Self {
            m: vec![0; n],
            v: vec![0; n],
            absmax_m: vec![0.0; blocks],
            absmax_v: vec![0.0; blocks],
        }
    }
}

/// The step's constants, in f32 as the kernel has them.
#[derive(Clone, Copy)]
struct Consts {
    beta1: f32,
    beta2: f32,
    eps: f32,
    lr: f32,
    weight_decay: f32,
    correction2: f32,
    step_size: f32,
}

impl Consts {
    fn new(h: &super::Hyper, lr: f64, t: u64) -> Self {
        let (beta1, beta2) = (h.beta1 as f32, h.beta2 as f32);
        let lr = lr as f32;
        let correction1 = 1.0 - beta1.powf(t as f32);
        let correction2 = (1.0 - beta2.powf(t as f32)).sqrt();
        Self {
            beta1,
            beta2,
            eps: h.eps as f32,
            lr,
            weight_decay: h.weight_decay as f32,
            correction2,
            step_size: -lr * correction2 / correction1,
        }
    }
}

/// The kernel's work on one block: `p`, `g`, `m`, `v` hold the block's elements (the last
/// block may be short; its missing elements count in the maxima as the kernel's padding
/// does: gradient 0, codes 128 and 0).
fn block(
    p: &mut [f32],
    g: &[f32],
    m: &mut [u8],
    v: &mut [u8],
    am: &mut f32,
    av: &mut f32,
    k: Consts,
) {
    let (codes1, codes2) = maps();
    let (code1, code2) = (&codes1.code, &codes2.code);
    let n = p.len();
    let mut s1 = [0f32; BLOCK];
    let mut s2 = [0f32; BLOCK];
    let (mut max1, mut max2) = (-f32::MAX, -f32::MAX);
    for j in 0..BLOCK {
        let (gj, c1, c2) = if j < n {
            (g[j], m[j], v[j])
        } else {
            (0.0, 128, 0)
        };
        if gj.is_finite() {
            s2[j] = code2[c2 as usize] * *av;
            s2[j] = s2[j] * k.beta2 + (1.0 - k.beta2) * gj * gj;
            s1[j] = code1[c1 as usize] * *am;
            s1[j] = s1[j] * k.beta1 + (1.0 - k.beta1) * gj;
        } else {
            s1[j] = 0.0;
            s2[j] = 0.0;
        }
        max1 = max1.max(s1[j].abs());
        max2 = max2.max(s2[j].abs());
    }
    *am = max1;
    *av = max2;
    // Branch-free so that it vectorises: a non-finite gradient keeps the weight.
    let decay = if k.weight_decay > 0.0 {
        1.0 - k.lr * k.weight_decay
    } else {
        1.0
    };
    for (((pj, &gj), &a), &b) in p.iter_mut().zip(g).zip(&s1).zip(&s2) {
        let stepped = (*pj + k.step_size * (a / (b.sqrt() + k.correction2 * k.eps))) * decay;
        *pj = if gj.is_finite() { stepped } else { *pj };
    }
    // The normalised moments first (a vectorised division), then the codes.
    let (mut x1, mut x2) = ([0f32; BLOCK], [0f32; BLOCK]);
    for j in 0..BLOCK {
        x1[j] = s1[j] / max1;
        x2[j] = s2[j] / max2;
    }
    for j in 0..n {
        let mut c1 = codes1.quantize(x1[j]);
        v[j] = codes2.quantize(x2[j]);
        if code1[c1 as usize].is_sign_negative() != s1[j].is_sign_negative() {
            c1 = if s1[j] > 0.0 {
                c1.wrapping_add(1)
            } else {
                c1.wrapping_sub(1)
            };
        }
        m[j] = c1;
    }
}

/// A parameter's update in its own storage (f32 on the CPU, contiguous).
struct InPlace<'a> {
    q: std::cell::RefCell<&'a mut Quantized>,
    k: Consts,
}

impl super::UpdateF32 for InPlace<'_> {
    const NAME: &'static str = "adamw8bit";

    fn update(&self, p: &mut [f32], g: &[f32]) -> candle_core::Result<()> {
        update_blocks(p, g, &mut self.q.borrow_mut(), self.k);
        Ok(())
    }
}

/// Every block of one parameter, in parallel.
fn update_blocks(p: &mut [f32], g: &[f32], q: &mut Quantized, k: Consts) {
    p.par_chunks_mut(BLOCK)
        .zip(g.par_chunks(BLOCK))
        .zip(q.m.par_chunks_mut(BLOCK))
        .zip(q.v.par_chunks_mut(BLOCK))
        .zip(q.absmax_m.par_iter_mut())
        .zip(q.absmax_v.par_iter_mut())
        .for_each(|(((((p, g), m), v), am), av)| block(p, g, m, v, am, av, k));
}

/// Bytes of state for one parameter of `n` elements.
pub(super) fn state_bytes(min_8bit_size: usize, n: u64) -> u64 {
    if n < min_8bit_size as u64 {
        8 * n
    } else {
        2 * n + 8 * n.div_ceil(BLOCK as u64)
    }
}

impl Optimizer {
    /// bnb's AdamW8bit update of one parameter.
    pub(super) fn update_adamw8bit(
        &mut self,
        gi: usize,
        vi: usize,
        grad: &Tensor,
        lr: f64,
    ) -> candle_core::Result<()> {
        let h = self.hyper;
        let k = Consts::new(&h, lr, self.steps);
        let var = &self.groups[gi].vars[vi];
        let g = grad.detach().to_dtype(DType::F32)?;
        let n = var.elem_count();
        if n < h.min_8bit_size {
            let p = var.as_tensor().detach().to_dtype(DType::F32)?;
            let new_p = update_f32(&mut self.state[gi][vi], &p, &g, k)?;
            return var.set(&new_p.to_dtype(var.dtype())?);
        }
        let q = self.quantized[gi][vi].get_or_insert_with(|| Quantized::zeros(n));
        if super::in_place_f32(var.as_tensor()) {
            let op = InPlace {
                q: std::cell::RefCell::new(q),
                k,
            };
            return super::update_in_place(var, &g, &op);
        }
        // Other dtypes and devices: through a copy on the CPU.
        let p = var.as_tensor().detach().to_dtype(DType::F32)?;
        let mut pv = p.flatten_all()?.to_vec1::<f32>()?;
        let gv = g.flatten_all()?.to_vec1::<f32>()?;
        update_blocks(&mut pv, &gv, q, k);
        let new_p = Tensor::from_vec(pv, p.dims(), p.device())?;
        var.set(&new_p.to_dtype(var.dtype())?)
    }
}

/// bnb's 32-bit kernel (`kOptimizer32bit2State`, Adam) for a small parameter, on its
/// device; `st` holds (m, v).
fn update_f32(
    st: &mut (Option<Tensor>, Option<Tensor>),
    p: &Tensor,
    g: &Tensor,
    k: Consts,
) -> candle_core::Result<Tensor> {
    let (b1, b2) = (k.beta1 as f64, k.beta2 as f64);
    let m = match st.0.take() {
        Some(m) => ((m * b1)? + (g * (1.0 - b1))?)?,
        None => (g * (1.0 - b1))?,
    };
    let v = match st.1.take() {
        Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
        None => (g.sqr()? * (1.0 - b2))?,
    };
    let denom = (v.sqrt()? + (k.eps * k.correction2) as f64)?;
    let mut p = (p + (m.div(&denom)? * k.step_size as f64)?)?;
    if k.weight_decay > 0.0 {
        p = (p * (1.0 - k.lr * k.weight_decay) as f64)?;
    }
    *st = (Some(m), Some(v));
    Ok(p)
}

const NAMES: [&str; 4] = ["state1", "state2", "absmax1", "absmax2"];

/// Appends the 8-bit moments as `<group>.<index>.state1` / `state2` (u8 codes, shaped as
/// the parameter) and `absmax1` / `absmax2` (f32 per block): bnb's names.
pub(super) fn save(o: &Optimizer, out: &mut Vec<(String, Tensor)>) -> candle_core::Result<()> {
    let cpu = Device::Cpu;
    for (gi, g) in o.groups.iter().enumerate() {
        for (vi, q) in o.quantized[gi].iter().enumerate() {
            let Some(q) = q else { continue };
            let dims = g.vars[vi].dims();
            let key = |s: &str| format!("{}.{vi}.{s}", g.name);
            out.push((key(NAMES[0]), Tensor::from_slice(&q.m, dims, &cpu)?));
            out.push((key(NAMES[1]), Tensor::from_slice(&q.v, dims, &cpu)?));
            let blocks = q.absmax_m.len();
            out.push((
                key(NAMES[2]),
                Tensor::from_slice(&q.absmax_m, blocks, &cpu)?,
            ));
            out.push((
                key(NAMES[3]),
                Tensor::from_slice(&q.absmax_v, blocks, &cpu)?,
            ));
        }
    }
    Ok(())
}

/// Restores what [`save`] wrote; shapes and types must fit the parameters.
pub(super) fn load(o: &mut Optimizer, tensors: &BTreeMap<String, Tensor>) -> Result<(), String> {
    for (gi, g) in o.groups.iter().enumerate() {
        for (vi, var) in g.vars.iter().enumerate() {
            let key = |s: &str| format!("{}.{vi}.{s}", g.name);
            let found: Vec<Option<&Tensor>> = NAMES.iter().map(|s| tensors.get(&key(s))).collect();
            let [Some(m), Some(v), Some(am), Some(av)] = found[..] else {
                if found.iter().any(Option::is_some) {
                    return Err(format!(
                        "optimizer state {}: state1, state2, absmax1 and absmax2 go together",
                        key("*")
                    ));
                }
                o.quantized[gi][vi] = None;
                continue;
            };
            let n = var.elem_count();
            let blocks = n.div_ceil(BLOCK);
            let bad = |s: &str, t: &Tensor, want: &str| {
                format!(
                    "optimizer state {} is {:?} {:?}, the parameter {:?} needs {want}",
                    key(s),
                    t.dtype(),
                    t.dims(),
                    var.dims()
                )
            };
            let codes = |s: &str, t: &Tensor| -> Result<Vec<u8>, String> {
                if t.dtype() != DType::U8 || t.dims() != var.dims() {
                    return Err(bad(s, t, "u8 codes of its shape"));
                }
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<u8>())
                    .map_err(|e| e.to_string())
            };
            let maxima = |s: &str, t: &Tensor| -> Result<Vec<f32>, String> {
                if t.dims() != [blocks] {
                    return Err(bad(s, t, &format!("{blocks} block maxima")));
                }
                t.to_dtype(DType::F32)
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| e.to_string())
            };
            o.quantized[gi][vi] = Some(Quantized {
                m: codes(NAMES[0], m)?,
                v: codes(NAMES[1], v)?,
                absmax_m: maxima(NAMES[2], am)?,
                absmax_v: maxima(NAMES[3], av)?,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testdata::{self as td, SHAPES};
    use super::super::{Hyper, Optimizer, OptimizerKind};
    use super::*;

    fn fixture() -> serde_json::Value {
        serde_json::from_str(include_str!(
            "../../../tests/fixtures/optim/adamw8bit_cuda.json"
        ))
        .unwrap()
    }

    fn hyper(args: &serde_json::Value) -> (Hyper, f64) {
        let mut list = vec![];
        for (k, v) in args.as_object().unwrap() {
            match (k.as_str(), v) {
                ("lr", _) => {}
                ("betas", serde_json::Value::Array(a)) => {
                    list.push(format!("betas={},{}", a[0], a[1]))
                }
                (_, v) => list.push(format!("{k}={v}")),
            }
        }
        let h = Hyper::defaults(OptimizerKind::AdamW8bit)
            .with_args(&list)
            .unwrap();
        (h, args["lr"].as_f64().unwrap())
    }

    /// The two maps are bnb's `create_dynamic_map(True/False)` to the bit.
    #[test]
    fn dynamic_maps_are_bnb_s() {
        let fx: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/fixtures/optim/bnb_maps.json"))
                .unwrap();
        for (key, signed) in [("signed", true), ("unsigned", false)] {
            let want: Vec<f32> = fx[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(dynamic_map(signed).to_vec(), want, "{key}");
        }
        // Nearest code, ties and ends included.
        let m = dynamic_map(true);
        for (i, &c) in m.iter().enumerate() {
            assert_eq!(quantize_search(&m, true, c) as usize, i);
            assert_eq!(maps().0.quantize(c) as usize, i);
        }
        assert_eq!(maps().0.quantize(-1.0), 0);
        assert_eq!(maps().0.quantize(1.0), 255);
    }

    /// The table-driven quantizer gives the kernel's binary search's code for every input:
    /// each code, the midpoints between neighbours and a few ulps around both, the ends and
    /// beyond, zeros, NaN and infinities, denormals, and a sweep over the f32 bit patterns.
    #[test]
    fn fast_quantize_is_the_kernel_search() {
        let (signed, unsigned) = maps();
        for (codes, is_signed) in [(signed, true), (unsigned, false)] {
            let code = dynamic_map(is_signed);
            let mut xs = vec![
                0.0f32,
                -0.0,
                1.0,
                -1.0,
                2.0,
                -2.0,
                1e30,
                -1e30,
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MIN_POSITIVE,
                -f32::MIN_POSITIVE,
                f32::from_bits(1),
                -f32::from_bits(1),
            ];
            for w in code.windows(2) {
                xs.extend([w[0], w[1], (w[0] + w[1]) * 0.5]);
            }
            let near: Vec<f32> = xs
                .iter()
                .filter(|x| x.is_finite())
                .flat_map(|&x| {
                    (-3i32..=3).map(move |d| f32::from_bits(x.to_bits().wrapping_add_signed(d)))
                })
                .collect();
            xs.extend(near);
            xs.extend((0..u32::MAX / 4099).map(|i| f32::from_bits(i * 4099)));
            for x in xs {
                assert_eq!(
                    codes.quantize(x),
                    quantize_search(&code, is_signed, x),
                    "signed {is_signed}, x {x:e} ({:#x})",
                    x.to_bits()
                );
            }
        }
    }

    /// bitsandbytes' AdamW8bit on CUDA (tests/fixtures/gen_optim8_fixtures.py, run on an
    /// H200): six updates; the 4320-element tensor with 8-bit moments (17 blocks, the last
    /// short), the others with 32-bit ones. Values within 1e-4 of the distance the steps
    /// may move (lr per step): the 8-bit kernel takes `1 - beta2^t` from the GPU's
    /// approximate `__powf`, which at beta2 0.999 is off by ~1e-4 relative, so its step
    /// size by ~6e-5 (bnb's CPU backend, which decays before the step and has no sign fix,
    /// is 50 times further off). The final codes and block maxima equal bnb's (a few codes
    /// may differ where the GPU's rounding puts a moment on a code boundary).
    #[test]
    fn adamw8bit_matches_bitsandbytes_cuda() {
        let fx = fixture();
        for case in ["default", "decay"] {
            let c = &fx[case];
            let (h, lr) = hyper(&c["args"]);
            let (vars, groups) = td::setup();
            let mut o = Optimizer::new(h, groups);
            let mut worst = 0f32;
            for (i, st) in c["steps"].as_array().unwrap().iter().enumerate() {
                o.step(&td::grads(i + 1), &[lr, lr]).unwrap();
                for (j, (name, _)) in SHAPES.iter().enumerate() {
                    if let Some(want) = st.get(*name) {
                        let e = td::max_abs(&td::values(&vars[j]), &td::f32s(want))
                            / (lr as f32 * (i + 1) as f32);
                        assert!(e < 1e-4, "{case} step {} {name}: off by {e:e}", i + 1);
                        worst = worst.max(e);
                    }
                }
            }
            let q = o.quantized[0][0].as_ref().unwrap();
            assert!(o.quantized[0][1].is_none() && o.state[0][1].0.is_some());
            let f = &c["final_state_a"];
            let diff = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count();
            let (dm, dv) = (
                diff(&q.m, &td::u8s(&f["state1"])),
                diff(&q.v, &td::u8s(&f["state2"])),
            );
            let em = td::max_rel(&q.absmax_m, &td::f32s(&f["absmax1"]), 0.0);
            let ev = td::max_rel(&q.absmax_v, &td::f32s(&f["absmax2"]), 0.0);
            eprintln!(
                "{case}: worst {worst:e}, codes differing {dm} / {dv}, absmax {em:e} / {ev:e}"
            );
            assert!(
                dm + dv <= 4 && em < 1e-5 && ev < 1e-5,
                "{case}: {dm} {dv} {em} {ev}"
            );
        }
    }

    /// Saved after two updates (through a safetensors file: u8 codes and f32 maxima) and
    /// loaded into a fresh optimizer, the run goes on to the same bits.
    #[test]
    fn adamw8bit_resume_is_exact() {
        let (h, lr) = hyper(&fixture()["decay"]["args"]);
        let (whole, groups) = td::setup();
        let mut o = Optimizer::new(h, groups);
        for t in 1..=6 {
            o.step(&td::grads(t), &[lr, lr]).unwrap();
        }
        let (first, groups) = td::setup();
        let mut a = Optimizer::new(h, groups);
        for t in 1..=2 {
            a.step(&td::grads(t), &[lr, lr]).unwrap();
        }
        let saved = super::super::tests::through_file(a.state_tensors().unwrap());
        assert_eq!(saved["g0.0.state1"].dtype(), DType::U8);
        assert_eq!(saved["g0.0.absmax1"].dims(), [17]);
        let bytes: usize = saved
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        // 2 bytes per element of `a` and 8 per block, 8 per element of the small ones.
        assert_eq!(bytes, 2 * 4320 + 8 * 17 + 8 * (7 + 216 + 128));
        assert_eq!(
            h.state_bytes(&SHAPES.iter().map(|s| s.1.to_vec()).collect::<Vec<_>>()),
            bytes as u64
        );
        let (resumed, groups) = td::setup();
        for (r, f) in resumed.iter().zip(&first) {
            r.set(f.as_tensor()).unwrap();
        }
        let mut b = Optimizer::new(h, groups);
        b.load_state(&saved, a.steps).unwrap();
        for t in 3..=6 {
            b.step(&td::grads(t), &[lr, lr]).unwrap();
        }
        for (x, y) in whole.iter().zip(&resumed) {
            assert_eq!(td::values(x), td::values(y));
        }
        let mut bad = saved.clone();
        bad.insert("g0.0.state1".into(), saved["g0.0.absmax1"].clone());
        let (_, groups) = td::setup();
        let e = Optimizer::new(h, groups).load_state(&bad, 2).unwrap_err();
        assert!(e.contains("g0.0.state1") && e.contains("u8 codes"), "{e}");
    }
}
