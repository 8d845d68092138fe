//! Order statistics over `f64` samples (NaNs are dropped).

/// The p-th percentile (0..=100) by linear interpolation between closest
/// ranks; `None` for no samples.
pub fn percentile(xs: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let r = (p.clamp(0.0, 100.0) / 100.0) * (v.len() - 1) as f64;
    let lo = r.floor() as usize;
    let hi = r.ceil() as usize;
    Some(v[lo] + (v[hi] - v[lo]) * (r - lo as f64))
}

/// The median.
pub fn median(xs: &[f64]) -> Option<f64> {
    percentile(xs, 50.0)
}

/// Interquartile range (p75 − p25).
pub fn iqr(xs: &[f64]) -> Option<f64> {
    Some(percentile(xs, 75.0)? - percentile(xs, 25.0)?)
}

/// The mean.
pub fn mean(xs: &[f64]) -> Option<f64> {
    let v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_and_ignore_order_and_nan() {
        let xs = [5.0, 1.0, f64::NAN, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
        assert_eq!(percentile(&xs, 100.0), Some(5.0));
        assert_eq!(median(&xs), Some(3.0));
        assert_eq!(percentile(&xs, 25.0), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.5));
        assert_eq!(iqr(&xs), Some(2.0));
        assert_eq!(mean(&xs), Some(3.0));
        assert_eq!(median(&[]), None);
        assert_eq!(mean(&[f64::NAN]), None);
    }
}
