//! Order statistics over `f64` samples (NaNs are dropped) and the
//! inference the evals use: Welch's t, TOST equivalence, two-sample KS,
//! k-sample Anderson–Darling, bootstrap CIs, and gaps between step curves.
//! All I/O-free and unit-tested against reference values (R / SciPy).

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

// ---------------------------------------------------------------------------
// Inference: the t distribution, TOST, KS, Anderson–Darling, bootstrap, curves.
// ---------------------------------------------------------------------------

fn finite(xs: &[f64]) -> Vec<f64> {
    xs.iter().copied().filter(|x| x.is_finite()).collect()
}

/// Sample variance (n − 1 denominator); `None` below 2 samples.
pub fn variance(xs: &[f64]) -> Option<f64> {
    let v = finite(xs);
    if v.len() < 2 {
        return None;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    Some(v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64)
}

/// ln Γ(x) for x > 0 (Lanczos approximation, g = 7, 9 terms; ~1e-15 relative).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1−x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).abs().ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularised incomplete beta function I_x(a, b), a, b > 0, x in [0, 1]
/// (continued fraction, modified Lentz; the symmetry I_x(a,b) = 1 − I_{1−x}(b,a)
/// keeps it in its fast-converging region).
pub fn inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - inc_beta(b, a, 1.0 - x);
    }
    let ln_front = a * x.ln() + b * (1.0 - x).ln() - (ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b));
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=500 {
        let m = m as f64;
        // Even term d_{2m} = m(b−m)x / ((a+2m−1)(a+2m)).
        let num = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        d = 1.0 + num * d;
        d = if d.abs() < TINY { 1.0 / TINY } else { 1.0 / d };
        c = 1.0 + num / c;
        if c.abs() < TINY {
            c = TINY;
        }
        h *= d * c;
        // Odd term d_{2m+1} = −(a+m)(a+b+m)x / ((a+2m)(a+2m+1)).
        let num = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        d = 1.0 + num * d;
        d = if d.abs() < TINY { 1.0 / TINY } else { 1.0 / d };
        c = 1.0 + num / c;
        if c.abs() < TINY {
            c = TINY;
        }
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    ln_front.exp() * h / a
}

/// CDF of Student's t with `df` > 0 degrees of freedom (real df: Welch).
pub fn t_cdf(t: f64, df: f64) -> f64 {
    if t.is_nan() || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if t.is_infinite() {
        return if t > 0.0 { 1.0 } else { 0.0 };
    }
    let tail = 0.5 * inc_beta(df / 2.0, 0.5, df / (df + t * t));
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The p-quantile (0 < p < 1) of Student's t with `df` degrees of freedom
/// (bisection on [`t_cdf`] to 1e-12).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if !(p > 0.0 && p < 1.0 && df > 0.0) {
        return f64::NAN;
    }
    let (mut lo, mut hi) = (-1.0, 1.0);
    while t_cdf(lo, df) > p {
        lo *= 2.0;
    }
    while t_cdf(hi, df) < p {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-12 * (1.0 + mid.abs()) {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// Welch's difference of means mean(b) − mean(a), its standard error and
/// Welch–Satterthwaite degrees of freedom; `None` below 2 samples per side.
fn welch(a: &[f64], b: &[f64]) -> Option<(f64, f64, f64)> {
    let (a, b) = (finite(a), finite(b));
    let (va, vb) = (variance(&a)?, variance(&b)?);
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let d = mean(&b)? - mean(&a)?;
    let (sa, sb) = (va / na, vb / nb);
    let se = (sa + sb).sqrt();
    let df =
        if sa + sb > 0.0 { (sa + sb).powi(2) / (sa * sa / (na - 1.0) + sb * sb / (nb - 1.0)) } else { na + nb - 2.0 };
    Some((d, se, df))
}

/// The result of a test with a statistic and a p-value.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TwoSample {
    /// The test statistic (t, D, or the standardised A²).
    pub stat: f64,
    /// Its p-value.
    pub p: f64,
}

/// Welch's two-sided t-test of equal means; stat = t of mean(b) − mean(a).
/// `None` below 2 finite samples per side or with both variances zero.
pub fn welch_t(a: &[f64], b: &[f64]) -> Option<TwoSample> {
    let (d, se, df) = welch(a, b)?;
    if se <= 0.0 {
        return None;
    }
    let t = d / se;
    Some(TwoSample { stat: t, p: (2.0 * t_cdf(-t.abs(), df)).min(1.0) })
}

/// Two one-sided tests (TOST) for equivalence of means, relative to
/// mean(control).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tost {
    /// (mean(treatment) − mean(control)) / mean(control).
    pub rel_diff: f64,
    /// The (1 − 2α) confidence interval of `rel_diff`.
    pub ci: (f64, f64),
    /// The larger of the two one-sided p-values.
    pub p: f64,
    /// p < α: the difference lies within ±margin (equivalently, `ci` does).
    pub equivalent: bool,
}

/// TOST with Welch's t (unequal variances, Welch–Satterthwaite df): H0 is
/// |mean(t) − mean(c)| / mean(c) ≥ `margin`, rejected (→ `equivalent`) when
/// both one-sided tests reject at `alpha`. The bounds ±margin·mean(c) treat
/// mean(c) as a constant (the usual approximation for relative margins).
/// `None` below 2 finite samples per side, for mean(c) ≤ 0 or bad parameters.
/// With zero variance on both sides, the difference is exact: p = 0 inside
/// the margin and 1 outside.
pub fn tost_relative(control: &[f64], treatment: &[f64], margin: f64, alpha: f64) -> Option<Tost> {
    if !(margin > 0.0 && alpha > 0.0 && alpha < 0.5) {
        return None;
    }
    let (d, se, df) = welch(control, treatment)?;
    let mc = mean(&finite(control))?;
    if mc <= 0.0 {
        return None;
    }
    let rel = d / mc;
    if se <= 0.0 {
        let inside = rel.abs() < margin;
        return Some(Tost { rel_diff: rel, ci: (rel, rel), p: if inside { 0.0 } else { 1.0 }, equivalent: inside });
    }
    let bound = margin * mc;
    // H01: d ≤ −bound (reject for large t_lo); H02: d ≥ +bound (reject for small t_hi).
    let p_lo = 1.0 - t_cdf((d + bound) / se, df);
    let p_hi = t_cdf((d - bound) / se, df);
    let p = p_lo.max(p_hi);
    let q = t_quantile(1.0 - alpha, df);
    let ci = ((d - q * se) / mc, (d + q * se) / mc);
    Some(Tost { rel_diff: rel, ci, p, equivalent: p < alpha })
}

/// Two-sample Kolmogorov–Smirnov test, two-sided: D = sup |F_a − F_b| over
/// the pooled values (ties handled by stepping past all equal values).
/// p-value: exact when n·m ≤ 1 000 000 — the fraction of the C(n+m, n)
/// equally likely merge orders whose ECDF difference reaches D (lattice-path
/// count; exact for continuous data, conservative-ish with ties) — and the
/// asymptotic Kolmogorov distribution otherwise, with Stephens' correction
/// λ = (√nₑ + 0.12 + 0.11/√nₑ)·D, nₑ = nm/(n+m). `None` if a side is empty.
pub fn ks_two_sample(a: &[f64], b: &[f64]) -> Option<TwoSample> {
    let d = ks_stat(a, b)?;
    let (n, m) = (a.iter().filter(|x| x.is_finite()).count(), b.iter().filter(|x| x.is_finite()).count());
    let p = if (n as u64) * (m as u64) <= 1_000_000 { ks_exact_p(n, m, d) } else { ks_asymptotic_p(n, m, d) };
    Some(TwoSample { stat: d, p: p.clamp(0.0, 1.0) })
}

/// The two-sample KS statistic D alone (no p-value: cheap enough for
/// permutation tests). `None` if a side is empty.
pub fn ks_stat(a: &[f64], b: &[f64]) -> Option<f64> {
    let (mut a, mut b) = (finite(a), finite(b));
    if a.is_empty() || b.is_empty() {
        return None;
    }
    a.sort_by(|x, y| x.total_cmp(y));
    b.sort_by(|x, y| x.total_cmp(y));
    let (n, m) = (a.len(), b.len());
    let (mut i, mut j, mut d) = (0usize, 0usize, 0.0f64);
    while i < n && j < m {
        let v = a[i].min(b[j]);
        while i < n && a[i] == v {
            i += 1;
        }
        while j < m && b[j] == v {
            j += 1;
        }
        d = d.max((i as f64 / n as f64 - j as f64 / m as f64).abs());
    }
    Some(d)
}

/// P(D ≥ d) under H0 for sample sizes n, m without ties: 1 − the fraction of
/// lattice paths from (0,0) to (n,m) staying strictly inside |i/n − j/m| < d.
/// u(i,j) is the fraction of paths to (i,j) that stayed inside, so the
/// recurrence needs no big binomials: u(i,j) = u(i−1,j)·i/(i+j) + u(i,j−1)·j/(i+j).
fn ks_exact_p(n: usize, m: usize, d: f64) -> f64 {
    let eps = 1e-9;
    let inside = |i: usize, j: usize| (i as f64 / n as f64 - j as f64 / m as f64).abs() < d - eps;
    let mut row = vec![0.0f64; m + 1];
    for i in 0..=n {
        for j in 0..=m {
            row[j] = if i == 0 && j == 0 {
                1.0
            } else if !inside(i, j) {
                0.0
            } else {
                let s = (i + j) as f64;
                let up = if i > 0 { row[j] * i as f64 / s } else { 0.0 };
                let left = if j > 0 { row[j - 1] * j as f64 / s } else { 0.0 };
                up + left
            };
        }
    }
    1.0 - row[m]
}

fn ks_asymptotic_p(n: usize, m: usize, d: f64) -> f64 {
    let ne = (n as f64 * m as f64) / (n + m) as f64;
    let lambda = (ne.sqrt() + 0.12 + 0.11 / ne.sqrt()) * d;
    if lambda < 0.2 {
        return 1.0;
    }
    let mut sum = 0.0;
    for k in 1..=100 {
        let k = k as f64;
        let term = (-2.0 * k * k * lambda * lambda).exp();
        sum += if k as u64 % 2 == 1 { term } else { -term };
        if term < 1e-16 {
            break;
        }
    }
    2.0 * sum
}

/// Scholz–Stephens (1987) k-sample Anderson–Darling test, midrank version
/// A²akN (for data with ties), standardised: stat = (A² − (k−1)) / σ_N.
/// p-value: from the paper's Table 2 critical values t_m(α) = b0 + b1/√m +
/// b2/m (m = k − 1, α ∈ {.25, .1, .05, .025, .01, .005, .001}), by a
/// quadratic least-squares fit of ln α on t_m(α) evaluated at stat — the
/// same approximation as SciPy's `anderson_ksamp` — and capped to
/// [0.001, 0.25] outside the table (so p = 0.25 means "≥ 0.25").
/// `None` for fewer than 2 samples, an empty sample, fewer than 2 distinct
/// values, or N < 4.
pub fn anderson_darling_k(samples: &[&[f64]]) -> Option<TwoSample> {
    let samples: Vec<Vec<f64>> = samples.iter().map(|s| finite(s)).collect();
    let k = samples.len();
    if k < 2 || samples.iter().any(|s| s.is_empty()) {
        return None;
    }
    // Pooled values with their sample, sorted; one pass over groups of equal
    // values: l_j copies of z_j, f_ij of them in sample i, and the counts
    // below z_j. Midranks: B_aj = (pooled < z_j) + l_j/2,
    // M_aij = (sample i < z_j) + f_ij/2.
    let mut z: Vec<(f64, usize)> =
        samples.iter().enumerate().flat_map(|(i, s)| s.iter().map(move |&x| (x, i))).collect();
    z.sort_by(|x, y| x.0.total_cmp(&y.0));
    let nn = z.len();
    let distinct = 1 + z.windows(2).filter(|w| w[0].0 != w[1].0).count();
    if distinct < 2 || nn < 4 {
        return None;
    }
    let nf = nn as f64;
    let sizes: Vec<f64> = samples.iter().map(|s| s.len() as f64).collect();
    let mut inner = vec![0.0f64; k];
    let mut below = vec![0usize; k];
    let mut f = vec![0usize; k];
    let mut start = 0;
    while start < nn {
        let mut end = start;
        f.iter_mut().for_each(|c| *c = 0);
        while end < nn && z[end].0 == z[start].0 {
            f[z[end].1] += 1;
            end += 1;
        }
        let lj = (end - start) as f64;
        let bj = start as f64 + lj / 2.0;
        let den = bj * (nf - bj) - nf * lj / 4.0;
        for i in 0..k {
            let mij = below[i] as f64 + f[i] as f64 / 2.0;
            if den > 0.0 {
                inner[i] += lj / nf * (nf * mij - bj * sizes[i]).powi(2) / den;
            }
            below[i] += f[i];
        }
        start = end;
    }
    let mut a2: f64 = inner.iter().zip(&sizes).map(|(x, n)| x / n).sum();
    a2 *= (nf - 1.0) / nf;
    let kf = k as f64;
    let hh: f64 = samples.iter().map(|s| 1.0 / s.len() as f64).sum();
    let h: f64 = (1..nn).map(|i| 1.0 / i as f64).sum();
    // g = Σ_{i=1}^{N−2} Σ_{j=i+1}^{N−1} 1/((N−i)·j)
    let mut g = 0.0;
    let mut tail = 0.0; // Σ_{j=i+1}^{N−1} 1/j, built from the top
    for i in (1..=nn.saturating_sub(2)).rev() {
        tail += 1.0 / (i + 1) as f64;
        g += tail / (nf - i as f64);
    }
    let a = (4.0 * g - 6.0) * (kf - 1.0) + (10.0 - 6.0 * g) * hh;
    let b = (2.0 * g - 4.0) * kf * kf + 8.0 * h * kf + (2.0 * g - 14.0 * h - 4.0) * hh - 8.0 * h + 4.0 * g - 6.0;
    let c = (6.0 * h + 2.0 * g - 2.0) * kf * kf + (4.0 * h - 4.0 * g + 6.0) * kf + (2.0 * h - 6.0) * hh + 4.0 * h;
    let d = (2.0 * h + 6.0) * kf * kf - 4.0 * h * kf;
    let var = (a * nf.powi(3) + b * nf * nf + c * nf + d) / ((nf - 1.0) * (nf - 2.0) * (nf - 3.0));
    if var.is_nan() || var <= 0.0 {
        return None;
    }
    let m = kf - 1.0;
    let stat = (a2 - m) / var.sqrt();
    Some(TwoSample { stat, p: ad_p(stat, m) })
}

/// Two-sample Anderson–Darling: [`anderson_darling_k`] with k = 2.
pub fn anderson_darling_2(a: &[f64], b: &[f64]) -> Option<TwoSample> {
    anderson_darling_k(&[a, b])
}

fn ad_p(stat: f64, m: f64) -> f64 {
    const SIG: [f64; 7] = [0.25, 0.1, 0.05, 0.025, 0.01, 0.005, 0.001];
    const B0: [f64; 7] = [0.675, 1.281, 1.645, 1.96, 2.326, 2.573, 3.085];
    const B1: [f64; 7] = [-0.245, 0.25, 0.678, 1.149, 1.822, 2.364, 3.615];
    const B2: [f64; 7] = [-0.105, -0.305, -0.362, -0.391, -0.396, -0.345, -0.154];
    let crit: Vec<f64> = (0..7).map(|i| B0[i] + B1[i] / m.sqrt() + B2[i] / m).collect();
    if stat < crit[0] {
        return SIG[0];
    }
    if stat > crit[6] {
        return SIG[6];
    }
    // Least squares ln(sig) ≈ c0 + c1·t + c2·t² (normal equations, 3×3).
    let mut s = [0.0f64; 5];
    let mut r = [0.0f64; 3];
    for i in 0..7 {
        let (t, y) = (crit[i], SIG[i].ln());
        for (p, sp) in s.iter_mut().enumerate() {
            *sp += t.powi(p as i32);
        }
        for (p, rp) in r.iter_mut().enumerate() {
            *rp += y * t.powi(p as i32);
        }
    }
    let mut mtx = [[s[0], s[1], s[2], r[0]], [s[1], s[2], s[3], r[1]], [s[2], s[3], s[4], r[2]]];
    for col in 0..3 {
        let piv = (col..3).max_by(|&x, &y| mtx[x][col].abs().total_cmp(&mtx[y][col].abs())).unwrap_or(col);
        mtx.swap(col, piv);
        for row in 0..3 {
            if row != col {
                let f = mtx[row][col] / mtx[col][col];
                let pivot_row = mtx[col];
                for (cell, pv) in mtx[row].iter_mut().zip(pivot_row).skip(col) {
                    *cell -= f * pv;
                }
            }
        }
    }
    let coef: Vec<f64> = (0..3).map(|i| mtx[i][3] / mtx[i][i]).collect();
    (coef[0] + coef[1] * stat + coef[2] * stat * stat).exp().clamp(SIG[6], SIG[0])
}

/// What a comparison of an arm with the baseline showed. "Not significant"
/// alone never counts as "the same": only a passed equivalence test does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The equivalence test passed and no difference test rejected.
    Equivalent,
    /// Neither shown equivalent nor shown different (too few runs, too noisy).
    NotShownEquivalent,
    /// A difference test rejected at α.
    Different,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Equivalent => "equivalent",
            Verdict::NotShownEquivalent => "not shown equivalent",
            Verdict::Different => "different",
        })
    }
}

/// Combines an equivalence test with difference tests: `Different` if any
/// p in `difference_p` is below `alpha` (a `None` test counts as not
/// rejecting), else `Equivalent` if `tost` is equivalent, else
/// `NotShownEquivalent` (also when the TOST could not be computed).
pub fn verdict(tost: Option<&Tost>, difference_p: &[Option<f64>], alpha: f64) -> Verdict {
    if difference_p.iter().flatten().any(|p| *p < alpha) {
        Verdict::Different
    } else if tost.is_some_and(|t| t.equivalent) {
        Verdict::Equivalent
    } else {
        Verdict::NotShownEquivalent
    }
}

/// SplitMix64: a tiny, portable, seeded generator (bootstrap resampling only).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        // Multiply-shift: bias ≤ n / 2^64, negligible for sample sizes.
        ((self.next() as u128 * n as u128) >> 64) as usize
    }
}

/// Permutation p-value of a two-sample statistic (larger = more different)
/// when observations come in clusters — e.g. the intervals of one run —
/// that are not independent within a cluster: whole clusters are shuffled
/// between the two sides (`reps` random relabellings, seeded), never single
/// observations. p = (1 + #{stat ≥ observed}) / (1 + reps), so it is never
/// below 1/(1 + reps) and, with one cluster per side, never below ½.
/// `None` if a side has no cluster, a statistic cannot be computed, or `reps` is 0.
pub fn cluster_permutation_p(
    a: &[Vec<f64>],
    b: &[Vec<f64>],
    stat: impl Fn(&[f64], &[f64]) -> Option<f64>,
    reps: usize,
    seed: u64,
) -> Option<f64> {
    if a.is_empty() || b.is_empty() || reps == 0 {
        return None;
    }
    let flat = |cs: &[&Vec<f64>]| cs.iter().flat_map(|c| c.iter().copied()).collect::<Vec<f64>>();
    let all: Vec<&Vec<f64>> = a.iter().chain(b.iter()).collect();
    let observed = stat(&flat(&all[..a.len()]), &flat(&all[a.len()..]))?;
    let mut rng = SplitMix(seed);
    let mut idx: Vec<usize> = (0..all.len()).collect();
    let mut hits = 0usize;
    for _ in 0..reps {
        // Fisher–Yates.
        for i in (1..idx.len()).rev() {
            idx.swap(i, rng.below(i + 1));
        }
        let pa: Vec<&Vec<f64>> = idx[..a.len()].iter().map(|&i| all[i]).collect();
        let pb: Vec<&Vec<f64>> = idx[a.len()..].iter().map(|&i| all[i]).collect();
        if stat(&flat(&pa), &flat(&pb)).is_some_and(|s| s >= observed - 1e-12 * observed.abs()) {
            hits += 1;
        }
    }
    Some((1 + hits) as f64 / (1 + reps) as f64)
}

/// Percentile-bootstrap confidence interval (at `level`, e.g. 0.95) of
/// mean(b) − mean(a): each of `reps` replicates resamples `a` and `b`
/// independently with replacement (the unit is whatever one element is —
/// pass one value per run to resample runs). Deterministic for a `seed`.
/// `None` if a side is empty, `reps` < 10 or `level` not in (0, 1).
pub fn bootstrap_ci_mean_diff(a: &[f64], b: &[f64], reps: usize, level: f64, seed: u64) -> Option<(f64, f64)> {
    let (a, b) = (finite(a), finite(b));
    if a.is_empty() || b.is_empty() || reps < 10 || !(level > 0.0 && level < 1.0) {
        return None;
    }
    let mut rng = SplitMix(seed);
    let mut resample_mean = |v: &[f64]| (0..v.len()).map(|_| v[rng.below(v.len())]).sum::<f64>() / v.len() as f64;
    let diffs: Vec<f64> = (0..reps)
        .map(|_| {
            let mb = resample_mean(&b);
            mb - resample_mean(&a)
        })
        .collect();
    let lo = percentile(&diffs, 50.0 * (1.0 - level))?;
    let hi = percentile(&diffs, 100.0 - 50.0 * (1.0 - level))?;
    Some((lo, hi))
}

/// The largest vertical gap |a(x) − b(x)| between two step curves given as
/// (x, y) points (any order; non-finite points dropped). Each curve is
/// right-continuous — y holds from its x until the next point's x — and
/// keeps its last y after its last point (a finished download stays
/// finished); it is undefined before its first point, so the gap is taken
/// over x ≥ the later of the two first x's, at every breakpoint of either
/// curve there. `None` if a curve is empty.
pub fn max_curve_gap(a: &[(f64, f64)], b: &[(f64, f64)]) -> Option<f64> {
    let prep = |c: &[(f64, f64)]| {
        let mut v: Vec<(f64, f64)> = c.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        v.sort_by(|p, q| p.0.total_cmp(&q.0));
        v
    };
    let (a, b) = (prep(a), prep(b));
    let start = a.first()?.0.max(b.first()?.0);
    // Value at x: the last point with px ≤ x (ties: the last listed wins).
    let at = |c: &[(f64, f64)], x: f64| c[c.partition_point(|p| p.0 <= x).saturating_sub(1)].1;
    let xs = a.iter().chain(b.iter()).map(|p| p.0).filter(|x| *x >= start).chain(std::iter::once(start));
    xs.map(|x| (at(&a, x) - at(&b, x)).abs()).reduce(f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic N(mu, sd) samples (SplitMix64 + Box–Muller).
    fn normal(n: usize, mu: f64, sd: f64, seed: u64) -> Vec<f64> {
        let mut r = SplitMix(seed);
        let mut u = || (r.next() >> 11) as f64 / (1u64 << 53) as f64 + 1e-300;
        (0..n).map(|_| mu + sd * (-2.0 * u().ln()).sqrt() * (2.0 * std::f64::consts::PI * u()).cos()).collect()
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b} (tol {tol})");
    }

    #[test]
    fn special_functions_match_reference_values() {
        close(ln_gamma(5.0), 24f64.ln(), 1e-12);
        close(ln_gamma(0.5), std::f64::consts::PI.sqrt().ln(), 1e-12);
        // I_0.5(2,3) = Σ_{j=2..4} C(4,j)/16 = 11/16.
        close(inc_beta(2.0, 3.0, 0.5), 0.6875, 1e-12);
        close(inc_beta(3.0, 2.0, 0.5), 1.0 - 0.6875, 1e-12);
        // R: pt(2, 5) = 0.9490303; df 1 is Cauchy: pt(1, 1) = 0.75;
        // df 2 closed form: 1/2 + t / (2 sqrt(2 + t²)).
        close(t_cdf(2.0, 5.0), 0.949_030_3, 1e-7);
        close(t_cdf(1.0, 1.0), 0.75, 1e-12);
        close(t_cdf(-1.0, 1.0), 0.25, 1e-12);
        close(t_cdf(1.0, 2.0), 0.5 + 1.0 / (2.0 * 3f64.sqrt()), 1e-12);
        close(t_cdf(0.0, 7.3), 0.5, 1e-15);
        // R: qt(0.975, 10) = 2.228139, qt(0.975, 5) = 2.570582,
        // qt(0.95, 1) = 6.313752, qt(0.975, 30) = 2.042272, qt(0.95, 20) = 1.724718.
        close(t_quantile(0.975, 10.0), 2.228_139, 1e-6);
        close(t_quantile(0.975, 5.0), 2.570_582, 1e-6);
        close(t_quantile(0.95, 1.0), 6.313_752, 1e-6);
        close(t_quantile(0.975, 30.0), 2.042_272, 1e-6);
        close(t_quantile(0.05, 20.0), -1.724_718, 1e-6);
        assert!(t_quantile(1.0, 3.0).is_nan());
    }

    #[test]
    fn t_cdf_at_real_df_matches_integrating_the_density() {
        // Welch df are not integers: compare with Simpson's rule over the pdf.
        let df: f64 = 5.882_352_941;
        let c = (ln_gamma((df + 1.0) / 2.0) - ln_gamma(df / 2.0)).exp() / (df * std::f64::consts::PI).sqrt();
        let pdf = |x: f64| c * (1.0 + x * x / df).powf(-(df + 1.0) / 2.0);
        let (a, b, n) = (0.0, 1.897_366_596, 2000);
        let h = (b - a) / n as f64;
        let mut s = pdf(a) + pdf(b);
        for i in 1..n {
            s += pdf(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        close(t_cdf(b, df), 0.5 + s * h / 3.0, 1e-9);
    }

    #[test]
    fn welch_matches_hand_computation() {
        // a: mean 3, var 2.5; b: mean 6, var 10 → se² = 2.5, t = 3/√2.5,
        // df = 2.5² / (0.5²/4 + 2²/4) = 5.882…
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        let b = [2.0, 4.0, 6.0, 8.0, 10.0];
        let (d, se, df) = welch(&a, &b).expect("welch");
        close(d, 3.0, 1e-12);
        close(se, 2.5f64.sqrt(), 1e-12);
        close(df, 6.25 / 1.0625, 1e-12);
        let w = welch_t(&a, &b).expect("t");
        close(w.stat, 3.0 / 2.5f64.sqrt(), 1e-12);
        close(w.p, 2.0 * (1.0 - t_cdf(w.stat, df)), 1e-12);
        assert!(w.p > 0.05 && w.p < 0.2, "{w:?}");
        assert!(welch_t(&[1.0], &b).is_none());
    }

    #[test]
    fn tost_accepts_close_means_and_refuses_shifted_or_noisy_ones() {
        let c = normal(10, 100.0, 1.0, 1);
        let t = normal(10, 100.2, 1.0, 2);
        let r = tost_relative(&c, &t, 0.02, 0.05).expect("tost");
        assert!(r.equivalent, "{r:?}");
        assert!(r.ci.0 > -0.02 && r.ci.1 < 0.02 && r.ci.0 < r.rel_diff && r.rel_diff < r.ci.1, "{r:?}");
        // Shifted by 5 %: not equivalent at ±2 %, and the CI lies outside.
        let s = normal(10, 105.0, 1.0, 3);
        let r = tost_relative(&c, &s, 0.02, 0.05).expect("tost");
        assert!(!r.equivalent && r.p > 0.5 && r.ci.0 > 0.02, "{r:?}");
        // Same mean but too noisy for 3 runs: not shown equivalent.
        let n1 = normal(3, 100.0, 10.0, 4);
        let n2 = normal(3, 100.0, 10.0, 5);
        let r = tost_relative(&n1, &n2, 0.02, 0.05).expect("tost");
        assert!(!r.equivalent, "{r:?}");
        // The verdict agrees with the CI inside ±margin.
        for seed in 10..40 {
            let t = normal(8, 101.0, 1.5, seed);
            let r = tost_relative(&c, &t, 0.02, 0.05).expect("tost");
            assert_eq!(r.equivalent, r.ci.0 > -0.02 && r.ci.1 < 0.02, "{r:?}");
        }
        assert!(tost_relative(&[1.0], &t, 0.02, 0.05).is_none());
        assert!(tost_relative(&c, &t, 0.0, 0.05).is_none());
        let z = tost_relative(&[5.0, 5.0], &[5.05, 5.05], 0.02, 0.05).expect("zero variance");
        assert!(z.equivalent && z.p == 0.0);
    }

    #[test]
    fn ks_exact_matches_counting_and_rejects_different_distributions() {
        // Complete separation, n = m = 5: 2 of C(10,5) = 252 orders (R/SciPy: 0.007937).
        let r = ks_two_sample(&[1.0, 2.0, 3.0, 4.0, 5.0], &[6.0, 7.0, 8.0, 9.0, 10.0]).expect("ks");
        close(r.stat, 1.0, 1e-12);
        close(r.p, 2.0 / 252.0, 1e-12);
        // n = m = 3 separated: 2 / C(6,3) = 0.1 (R: ks.test(1:3, 4:6)$p.value = 0.1).
        close(ks_two_sample(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).expect("ks").p, 0.1, 1e-12);
        // Identical samples: D = 0 (ties stepped over together), p = 1.
        let r = ks_two_sample(&[1.0, 2.0, 2.0, 3.0], &[3.0, 2.0, 1.0, 2.0]).expect("ks");
        assert_eq!((r.stat, r.p), (0.0, 1.0));
        // Interleaved: D = 1/4.
        close(ks_two_sample(&[1.0, 3.0, 5.0, 7.0], &[2.0, 4.0, 6.0, 8.0]).expect("ks").stat, 0.25, 1e-12);
        // Same distribution: no rejection; a shift by one sd or a doubled sd: rejected.
        let a = normal(200, 0.0, 1.0, 7);
        assert!(ks_two_sample(&a, &normal(200, 0.0, 1.0, 8)).expect("ks").p > 0.05);
        assert!(ks_two_sample(&a, &normal(200, 1.0, 1.0, 9)).expect("ks").p < 1e-6);
        assert!(ks_two_sample(&a, &normal(200, 0.0, 3.0, 10)).expect("ks").p < 1e-3);
        assert!(ks_two_sample(&[], &a).is_none());
    }

    #[test]
    fn ks_asymptotic_is_close_to_exact() {
        for (n, m, d) in [(100, 100, 0.2), (80, 120, 0.15), (150, 150, 0.1)] {
            let (e, s) = (ks_exact_p(n, m, d), ks_asymptotic_p(n, m, d));
            // The lattice makes D discrete; the continuous limit is off by ~0.02 here.
            assert!((e - s).abs() < 0.03, "n={n} m={m} d={d}: exact {e} asymptotic {s}");
        }
        // Large samples take the asymptotic path and still reject a shift.
        let a = normal(1200, 0.0, 1.0, 11);
        let b = normal(1000, 0.3, 1.0, 12);
        assert!(ks_two_sample(&a, &b).expect("ks").p < 1e-6);
    }

    #[test]
    fn anderson_darling_matches_scholz_stephens_example() {
        // Scholz & Stephens (1987), Lehmann's paper-smoothness data; SciPy
        // anderson_ksamp(midrank=True) gives 4.480 and p ≈ 0.0020.
        let t1 = [38.7, 41.5, 43.8, 44.5, 45.5, 46.0, 47.7, 58.0];
        let t2 = [39.2, 39.3, 39.7, 41.4, 41.8, 42.9, 43.3, 45.8];
        let t3 = [34.0, 35.0, 39.0, 40.0, 43.0, 43.0, 44.0, 45.0];
        let t4 = [34.0, 34.8, 34.8, 35.4, 37.2, 37.8, 41.2, 42.8];
        let r = anderson_darling_k(&[&t1, &t2, &t3, &t4]).expect("ad");
        close(r.stat, 4.480, 5e-4);
        close(r.p, 0.0020, 2.5e-4);
    }

    #[test]
    fn anderson_darling_two_sample_rejects_only_differences() {
        let a = normal(150, 0.0, 1.0, 21);
        let same = anderson_darling_2(&a, &normal(150, 0.0, 1.0, 22)).expect("ad");
        assert!(same.p > 0.05, "{same:?}");
        let shifted = anderson_darling_2(&a, &normal(150, 0.8, 1.0, 23)).expect("ad");
        assert!(shifted.p <= 0.001 && shifted.stat > 5.0, "{shifted:?}");
        let wider = anderson_darling_2(&a, &normal(150, 0.0, 3.0, 24)).expect("ad");
        assert!(wider.p < 0.01, "{wider:?}");
        assert!(anderson_darling_2(&[1.0, 1.0], &[1.0, 1.0]).is_none());
        assert!(anderson_darling_2(&[], &a).is_none());
    }

    #[test]
    fn bootstrap_ci_covers_the_shift_and_is_reproducible() {
        let a = normal(10, 100.0, 2.0, 31);
        let b = normal(10, 110.0, 2.0, 32);
        let (lo, hi) = bootstrap_ci_mean_diff(&a, &b, 4000, 0.95, 7).expect("ci");
        let d = mean(&b).unwrap() - mean(&a).unwrap();
        assert!(lo < d && d < hi && lo > 5.0 && hi < 15.0, "({lo}, {hi}) around {d}");
        assert_eq!(bootstrap_ci_mean_diff(&a, &b, 4000, 0.95, 7), Some((lo, hi)));
        let (l2, h2) = bootstrap_ci_mean_diff(&a, &normal(10, 100.0, 2.0, 33), 4000, 0.95, 7).expect("ci");
        assert!(l2 < 0.0 && 0.0 < h2, "({l2}, {h2})");
        assert!(bootstrap_ci_mean_diff(&[], &b, 100, 0.95, 1).is_none());
        assert!(bootstrap_ci_mean_diff(&a, &b, 100, 1.0, 1).is_none());
    }

    #[test]
    fn curve_gap_is_the_largest_vertical_distance_between_steps() {
        let a = [(0.0, 0.0), (1.0, 0.5), (2.0, 1.0)];
        let b = [(0.0, 0.0), (1.5, 0.5), (3.0, 1.0)];
        // On [1, 1.5) a = 0.5, b = 0; on [2, 3) a = 1, b = 0.5.
        assert_eq!(max_curve_gap(&a, &b), Some(0.5));
        assert_eq!(max_curve_gap(&a, &a), Some(0.0));
        // Order of points does not matter; the last value holds after the end.
        let c = [(2.0, 1.0), (0.0, 0.0)];
        assert_eq!(max_curve_gap(&c, &[(0.0, 0.0), (10.0, 0.2)]), Some(1.0));
        // Before its first point a curve is undefined: only x ≥ 5 counts.
        assert_eq!(max_curve_gap(&[(0.0, 9.0), (5.0, 1.0)], &[(5.0, 1.0)]), Some(0.0));
        assert_eq!(max_curve_gap(&[], &a), None);
    }

    #[test]
    fn verdicts_need_an_equivalence_test_to_say_equivalent() {
        let eq = Tost { rel_diff: 0.0, ci: (-0.01, 0.01), p: 0.01, equivalent: true };
        let ne = Tost { equivalent: false, p: 0.3, ..eq };
        assert_eq!(verdict(Some(&eq), &[Some(0.4), None], 0.05), Verdict::Equivalent);
        assert_eq!(verdict(Some(&ne), &[Some(0.4)], 0.05), Verdict::NotShownEquivalent);
        assert_eq!(verdict(None, &[], 0.05), Verdict::NotShownEquivalent);
        assert_eq!(verdict(Some(&eq), &[Some(0.001)], 0.05), Verdict::Different);
        assert_eq!(Verdict::NotShownEquivalent.to_string(), "not shown equivalent");
    }

    #[test]
    fn cluster_permutation_shuffles_whole_runs() {
        let ks = |x: &[f64], y: &[f64]| ks_stat(x, y);
        // Runs whose levels differ a lot from run to run, same distribution of levels in both arms:
        // pooled KS rejects (intervals are not independent), the permutation over runs does not.
        let run = |level: f64, seed: u64| normal(40, level, 0.2, seed);
        let a: Vec<Vec<f64>> = (0..6).map(|i| run([5.0, 8.0, 6.0, 9.0, 7.0, 10.0][i], i as u64)).collect();
        let b: Vec<Vec<f64>> = (0..6).map(|i| run([9.5, 5.5, 8.5, 6.5, 7.5, 6.0][i], 50 + i as u64)).collect();
        let pooled = ks_two_sample(&a.concat(), &b.concat()).expect("ks").p;
        let perm = cluster_permutation_p(&a, &b, ks, 2000, 3).expect("perm");
        assert!(pooled < 0.05 && perm > 0.2, "pooled {pooled}, permutation {perm}");
        // A real shift in every run is found by the permutation too.
        let c: Vec<Vec<f64>> = (0..6).map(|i| run(20.0 + i as f64, 80 + i as u64)).collect();
        let perm = cluster_permutation_p(&a, &c, ks, 2000, 3).expect("perm");
        assert!(perm < 0.01, "{perm}");
        // One run per side can never reach significance.
        assert!(cluster_permutation_p(&a[..1], &c[..1], ks, 200, 3).expect("perm") >= 0.5);
        assert!(cluster_permutation_p(&[], &c, ks, 200, 3).is_none());
    }

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
