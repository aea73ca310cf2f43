//! Band-limited resampling with a Kaiser-windowed sinc filter.
//!
//! Output sample `n` sits at input time `t = n * from / to` and is the sum of the
//! input samples around `t` weighted by a low-pass kernel whose cutoff is just
//! below the lower of the two Nyquist frequencies, so downsampling does not alias.
//! Samples beyond either end count as zero. For the usual rates the ratio is a
//! small fraction `up / down`, and the kernel has only `up` distinct phases: those
//! are tabulated once. Other ratios read a finely sampled kernel with linear
//! interpolation.

use crate::MediaError;

/// Zero crossings of the sinc kept on each side: sets the transition width.
const ZERO_CROSSINGS: f64 = 32.0;
/// Cutoff as a fraction of the output (or input) Nyquist frequency.
const ROLLOFF: f64 = 0.95;
/// Kaiser window shape: about -90 dB stop band.
const KAISER_BETA: f64 = 9.0;
/// Largest phase table (phases x taps f32s stay under a few MB).
const MAX_PHASES: u64 = 4096;
/// Kernel samples per input sample for the interpolated path.
const OVERSAMPLE: usize = 512;

/// Resample mono `samples` from `from_hz` to `to_hz`. The output has
/// `round(len * to_hz / from_hz)` samples; equal rates return a copy.
pub fn resample(samples: &[f32], from_hz: u32, to_hz: u32) -> Result<Vec<f32>, MediaError> {
    if from_hz == 0 || to_hz == 0 {
        return Err(MediaError::Invalid(format!(
            "sample rates must be positive (resampling {from_hz} Hz -> {to_hz} Hz)"
        )));
    }
    if from_hz == to_hz || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let (from, to) = (from_hz as u64, to_hz as u64);
    let len = samples.len() as u64;
    // round(len * to / from), half up; u128 so huge inputs cannot overflow.
    let out_len = ((len as u128 * to as u128 * 2 + from as u128) / (2 * from as u128)) as usize;
    let g = gcd(from, to);
    let (up, down) = (to / g, from / g);
    let kernel = Kernel::new(from, to);
    Ok(if up <= MAX_PHASES {
        resample_table(samples, out_len, up, down, &kernel)
    } else {
        resample_interp(samples, out_len, from, to, &kernel)
    })
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The continuous low-pass kernel, in units of input samples.
struct Kernel {
    /// Cutoff in cycles per input sample.
    fc: f64,
    /// Support is |x| < half_len.
    half_len: f64,
    i0_beta: f64,
}

impl Kernel {
    fn new(from: u64, to: u64) -> Self {
        let ratio = (to as f64 / from as f64).min(1.0);
        let fc = 0.5 * ratio * ROLLOFF;
        Kernel {
            fc,
            half_len: ZERO_CROSSINGS / (2.0 * fc),
            i0_beta: bessel_i0(KAISER_BETA),
        }
    }

    fn eval(&self, x: f64) -> f64 {
        let r = x / self.half_len;
        if r.abs() >= 1.0 {
            return 0.0;
        }
        let arg = 2.0 * self.fc * x;
        let sinc = if arg.abs() < 1e-12 {
            1.0
        } else {
            (std::f64::consts::PI * arg).sin() / (std::f64::consts::PI * arg)
        };
        let window = bessel_i0(KAISER_BETA * (1.0 - r * r).sqrt()) / self.i0_beta;
        2.0 * self.fc * sinc * window
    }

    /// Taps reach this far (in whole samples) on either side of the centre sample.
    fn reach(&self) -> i64 {
        self.half_len.ceil() as i64 + 1
    }
}

/// Modified Bessel function of the first kind, order 0 (power series).
fn bessel_i0(x: f64) -> f64 {
    let q = x * x / 4.0;
    let (mut sum, mut term, mut k) = (1.0f64, 1.0f64, 1.0f64);
    while term > sum * 1e-17 {
        term *= q / (k * k);
        sum += term;
        k += 1.0;
    }
    sum
}

/// One weighted sum: taps[j] multiplies input sample `first + j` (zero outside).
#[inline]
fn dot(samples: &[f32], first: i64, taps: &[f32]) -> f32 {
    let n = samples.len() as i64;
    let lo = first.max(0);
    let hi = (first + taps.len() as i64).min(n);
    if lo >= hi {
        return 0.0;
    }
    let xs = &samples[lo as usize..hi as usize];
    let ws = &taps[(lo - first) as usize..(hi - first) as usize];
    xs.iter().zip(ws).map(|(x, w)| x * w).sum()
}

/// Rational ratio up/down: output n has phase (n * down) mod up, one tap row per phase.
fn resample_table(samples: &[f32], out_len: usize, up: u64, down: u64, k: &Kernel) -> Vec<f32> {
    let reach = k.reach();
    let width = (2 * reach + 1) as usize;
    let mut table = vec![0f32; up as usize * width];
    for p in 0..up as usize {
        let frac = p as f64 / up as f64;
        let row = &mut table[p * width..(p + 1) * width];
        let mut w: Vec<f64> = (0..width)
            .map(|j| k.eval((j as i64 - reach) as f64 - frac))
            .collect();
        // Unit gain at DC for every phase, so a constant stays constant.
        let s: f64 = w.iter().sum();
        if s != 0.0 {
            w.iter_mut().for_each(|v| *v /= s);
        }
        row.iter_mut().zip(&w).for_each(|(r, v)| *r = *v as f32);
    }
    (0..out_len as u64)
        .map(|n| {
            let pos = n * down;
            let (base, phase) = ((pos / up) as i64, (pos % up) as usize);
            dot(
                samples,
                base - reach,
                &table[phase * width..(phase + 1) * width],
            )
        })
        .collect()
}

/// Any ratio: read the kernel from a table sampled OVERSAMPLE times per input sample.
fn resample_interp(samples: &[f32], out_len: usize, from: u64, to: u64, k: &Kernel) -> Vec<f32> {
    let reach = k.reach();
    let width = (2 * reach + 1) as usize;
    let n_tab = (k.half_len * OVERSAMPLE as f64).ceil() as usize + 2;
    let tab: Vec<f64> = (0..n_tab)
        .map(|i| k.eval(i as f64 / OVERSAMPLE as f64))
        .collect();
    let lookup = |x: f64| {
        let p = x.abs() * OVERSAMPLE as f64;
        let i = p as usize;
        if i + 1 >= n_tab {
            return 0.0;
        }
        let f = p - i as f64;
        tab[i] * (1.0 - f) + tab[i + 1] * f
    };
    let mut taps = vec![0f32; width];
    let mut w = vec![0f64; width];
    (0..out_len as u64)
        .map(|n| {
            let pos = n as u128 * from as u128;
            let base = (pos / to as u128) as i64;
            let frac = (pos % to as u128) as f64 / to as f64;
            let mut s = 0.0;
            for (j, v) in w.iter_mut().enumerate() {
                *v = lookup((j as i64 - reach) as f64 - frac);
                s += *v;
            }
            for (t, v) in taps.iter_mut().zip(&w) {
                *t = if s != 0.0 { (*v / s) as f32 } else { 0.0 };
            }
            dot(samples, base - reach, &taps)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    fn sine(freq: f64, rate: u32, n: usize, amp: f64) -> Vec<f32> {
        (0..n)
            .map(|i| (amp * (2.0 * PI * freq * i as f64 / rate as f64).sin()) as f32)
            .collect()
    }

    fn rms(x: &[f32]) -> f64 {
        (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
    }

    /// Max deviation from the ideal tone, away from the zero-padded edges.
    fn max_err_vs_ideal(out: &[f32], freq: f64, rate: u32, amp: f64, margin: usize) -> f64 {
        let ideal = sine(freq, rate, out.len(), amp);
        out[margin..out.len() - margin]
            .iter()
            .zip(&ideal[margin..out.len() - margin])
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max)
    }

    #[test]
    fn lengths_and_identity() {
        let x = sine(440.0, 44100, 44100, 0.5);
        assert_eq!(resample(&x, 44100, 44100).unwrap(), x);
        assert_eq!(resample(&x, 44100, 16000).unwrap().len(), 16000);
        assert_eq!(resample(&x[..1001], 44100, 16000).unwrap().len(), 363); // 363.17
        assert_eq!(resample(&x[..3], 8000, 16000).unwrap().len(), 6);
        assert_eq!(resample(&x[..1], 16000, 8000).unwrap().len(), 1); // 0.5 rounds up
        assert!(resample(&[], 44100, 16000).unwrap().is_empty());
        assert!(matches!(
            resample(&x, 0, 16000),
            Err(MediaError::Invalid(_))
        ));
        assert!(matches!(
            resample(&x, 16000, 0),
            Err(MediaError::Invalid(_))
        ));
    }

    #[test]
    fn downsampled_tone_keeps_frequency_and_amplitude() {
        let x = sine(1000.0, 44100, 44100, 0.8);
        let y = resample(&x, 44100, 16000).unwrap();
        assert!(max_err_vs_ideal(&y, 1000.0, 16000, 0.8, 200) < 1e-3);
        assert!((rms(&y[200..15800]) - 0.8 / 2f64.sqrt()).abs() < 1e-3);
    }

    #[test]
    fn upsampled_tone_keeps_frequency_and_amplitude() {
        let x = sine(1000.0, 8000, 8000, 0.5);
        let y = resample(&x, 8000, 16000).unwrap();
        assert!(max_err_vs_ideal(&y, 1000.0, 16000, 0.5, 200) < 1e-3);
    }

    #[test]
    fn tone_above_new_nyquist_is_removed() {
        // 10 kHz cannot exist at 16 kHz; a naive decimator would alias it to 6 kHz.
        let x = sine(10_000.0, 44100, 44100, 0.8);
        let y = resample(&x, 44100, 16000).unwrap();
        assert!(
            rms(&y[200..15800]) < 0.8 * 1e-3,
            "rms {}",
            rms(&y[200..15800])
        );
        // 8.6 kHz: just past the transition band.
        let x = sine(8600.0, 48000, 48000, 0.8);
        let y = resample(&x, 48000, 16000).unwrap();
        assert!(
            rms(&y[200..15800]) < 0.8 * 1e-3,
            "rms {}",
            rms(&y[200..15800])
        );
    }

    #[test]
    fn odd_ratio_uses_interpolated_kernel() {
        // 44101 / 16000 does not reduce: 16000 phases, beyond the table limit.
        let x = sine(1000.0, 44101, 44101, 0.8);
        let y = resample(&x, 44101, 16000).unwrap();
        assert_eq!(y.len(), 16000);
        assert!(max_err_vs_ideal(&y, 1000.0, 16000, 0.8, 200) < 1e-3);
        let x = sine(10_000.0, 44101, 44101, 0.8);
        let y = resample(&x, 44101, 16000).unwrap();
        assert!(rms(&y[200..15800]) < 0.8 * 1e-3);
    }

    #[test]
    fn constant_stays_constant() {
        let x = vec![0.25f32; 5000];
        for (a, b) in [
            (44100, 16000),
            (22050, 16000),
            (8000, 16000),
            (16000, 48000),
        ] {
            let y = resample(&x, a, b).unwrap();
            let m = y.len();
            let skip = m / 10;
            for v in &y[skip..m - skip] {
                assert!((v - 0.25).abs() < 1e-5, "{a}->{b}: {v}");
            }
        }
    }
}
