//! Line plots as PNG with the plotters bitmap backend. No text is drawn (no
//! font libraries needed): light grid lines at round steps, which
//! [`line_plot`] returns so that the Markdown caption can state them.

use plotters::prelude::*;
use std::path::Path;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No finite point to draw.
    #[error("nothing to plot")]
    Empty,
    /// The backend failed (e.g. writing the file).
    #[error("drawing {0}")]
    Draw(String),
}

/// One line of a plot.
pub struct Series {
    /// (x, y) points, in x order.
    pub points: Vec<(f64, f64)>,
    /// RGB colour.
    pub color: (u8, u8, u8),
}

/// The axes' ranges and grid steps of a drawn plot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Axes {
    /// x range.
    pub x: (f64, f64),
    /// y range.
    pub y: (f64, f64),
    /// Spacing of the vertical grid lines.
    pub x_step: f64,
    /// Spacing of the horizontal grid lines.
    pub y_step: f64,
}

/// A round grid step (1, 2 or 5 × 10^k) giving about `n` lines over `span`.
pub fn nice_step(span: f64, n: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / n;
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * p).find(|s| *s >= raw).unwrap_or(10.0 * p)
}

/// Draws `series` into a 640×300 PNG at `path`, with black vertical lines at
/// `marks` (e.g. checkpoint instants) and grid lines every returned step.
pub fn line_plot(path: &Path, series: &[Series], marks: &[f64]) -> Result<Axes, PlotError> {
    draw(path, series, marks, true)
}

/// As [`line_plot`], but every series is drawn as one unbroken line: for
/// curves whose x is not time (CDFs), where a jump in x is not missing data.
pub fn curve_plot(path: &Path, series: &[Series], marks: &[f64]) -> Result<Axes, PlotError> {
    draw(path, series, marks, false)
}

fn draw(path: &Path, series: &[Series], marks: &[f64], split_gaps: bool) -> Result<Axes, PlotError> {
    let pts = || series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(PlotError::Empty);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let err = |e: &dyn std::fmt::Display| PlotError::Draw(e.to_string());
    let root = BitMapBackend::new(path, (640, 300)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root).margin(8).build_cartesian_2d(x0..x1, y0..y1).map_err(|e| err(&e))?;
    let grey = RGBColor(220, 220, 220);
    let (xs, ys) = (nice_step(x1 - x0, 10.0), nice_step(y1 - y0, 6.0));
    let mut x = (x0 / xs).ceil() * xs;
    while x <= x1 {
        chart.draw_series(LineSeries::new([(x, y0), (x, y1)], &grey)).map_err(|e| err(&e))?;
        x += xs;
    }
    let mut y = (y0 / ys).ceil() * ys;
    while y <= y1 {
        let c = if y.abs() < ys * 1e-6 { RGBColor(150, 150, 150) } else { grey };
        chart.draw_series(LineSeries::new([(x0, y), (x1, y)], &c)).map_err(|e| err(&e))?;
        y += ys;
    }
    for &m in marks {
        chart.draw_series(LineSeries::new([(m, y0), (m, y1)], &BLACK)).map_err(|e| err(&e))?;
    }
    for s in series {
        let c = RGBColor(s.color.0, s.color.1, s.color.2);
        let p: Vec<(f64, f64)> = s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        let segs = if split_gaps { segments(&p) } else { vec![&p[..]] };
        for seg in segs {
            chart.draw_series(LineSeries::new(seg.iter().copied(), c.stroke_width(2))).map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(Axes { x: (x0, x1), y: (y0, y1), x_step: xs, y_step: ys })
}

/// Splits points where x jumps by more than 10 × the median step (a gap in
/// the data, e.g. a frozen guest printing nothing, is not drawn as a line).
pub fn segments(p: &[(f64, f64)]) -> Vec<&[(f64, f64)]> {
    let mut dx: Vec<f64> = p.windows(2).map(|w| w[1].0 - w[0].0).filter(|d| *d > 0.0).collect();
    dx.sort_by(|a, b| a.total_cmp(b));
    let Some(&med) = dx.get(dx.len() / 2) else { return vec![p] };
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..p.len() {
        if p[i].0 - p[i - 1].0 > 10.0 * med {
            out.push(&p[start..i]);
            start = i;
        }
    }
    out.push(&p[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_split_series() {
        let p = [(0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (30.0, 1.0), (31.0, 1.0)];
        let s = segments(&p);
        assert_eq!(s.len(), 2);
        assert_eq!(s[1], &p[3..]);
        assert_eq!(segments(&p[..1]).len(), 1);
    }

    #[test]
    fn nice_steps_are_round() {
        assert_eq!(nice_step(10.0, 10.0), 1.0);
        assert_eq!(nice_step(13.0, 10.0), 2.0);
        assert_eq!(nice_step(0.4, 6.0), 0.1);
        assert_eq!(nice_step(0.0, 6.0), 1.0);
    }

    #[test]
    fn writes_a_png_and_refuses_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.png");
        let s = Series { points: vec![(0.0, 0.0), (1.0, 2.0), (2.0, 1.0)], color: (200, 0, 0) };
        let axes = line_plot(&p, &[s], &[1.0]).expect("plot");
        let bytes = std::fs::read(&p).expect("png written");
        assert_eq!(&bytes[1..4], b"PNG");
        assert_eq!(axes.x, (0.0, 2.0));
        assert!(matches!(line_plot(&dir.path().join("e.png"), &[], &[]), Err(PlotError::Empty)));
    }
}
