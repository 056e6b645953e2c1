// SPDX-License-Identifier: Apache-2.0
//! Just enough SVG for two kinds of chart: lines with whiskers over a small integer x axis, and
//! grouped bars with whiskers. Hand-written (no plotting crate: the dependency rule).

use std::fmt::Write as _;

/// Series colours (colour-blind safe: Okabe-Ito).
pub const COLOURS: [&str; 6] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG document being drawn.
pub struct Svg {
    w: f64,
    h: f64,
    body: String,
}

impl Svg {
    /// A blank `w` x `h` canvas with a white background.
    pub fn new(w: f64, h: f64) -> Svg {
        let mut s = Svg {
            w,
            h,
            body: String::new(),
        };
        s.rect(0.0, 0.0, w, h, "#ffffff", None);
        s
    }

    /// A filled rectangle, optionally outlined.
    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, stroke: Option<&str>) {
        let stroke = stroke
            .map(|c| format!(r#" stroke="{c}" stroke-width="1""#))
            .unwrap_or_default();
        let _ = writeln!(
            self.body,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{fill}"{stroke}/>"#
        );
    }

    /// A line segment; `dash` e.g. `"4 3"`.
    pub fn line(
        &mut self,
        (x1, y1): (f64, f64),
        (x2, y2): (f64, f64),
        colour: &str,
        width: f64,
        dash: Option<&str>,
    ) {
        let dash = dash
            .map(|d| format!(r#" stroke-dasharray="{d}""#))
            .unwrap_or_default();
        let _ = writeln!(
            self.body,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{colour}" stroke-width="{width}"{dash}/>"#
        );
    }

    /// A polyline through `points`.
    pub fn polyline(&mut self, points: &[(f64, f64)], colour: &str, width: f64) {
        let pts: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let _ = writeln!(
            self.body,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="{width}"/>"#,
            pts.join(" ")
        );
    }

    /// A filled circle.
    pub fn circle(&mut self, x: f64, y: f64, r: f64, colour: &str) {
        let _ = writeln!(
            self.body,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="{r}" fill="{colour}"/>"#
        );
    }

    /// Text; `anchor` is start, middle or end.
    pub fn text(&mut self, x: f64, y: f64, s: &str, size: f64, anchor: &str, bold: bool) {
        let weight = if bold { r#" font-weight="bold""# } else { "" };
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" font-family="sans-serif" font-size="{size}" text-anchor="{anchor}"{weight}>{}</text>"#,
            esc(s)
        );
    }

    /// Text rotated by -90 degrees around its anchor (for y axis titles).
    pub fn vtext(&mut self, x: f64, y: f64, s: &str, size: f64) {
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" font-family="sans-serif" font-size="{size}" text-anchor="middle" transform="rotate(-90 {x:.1} {y:.1})">{}</text>"#,
            esc(s)
        );
    }

    /// A vertical whisker from `lo` to `hi` at `x`, with caps.
    pub fn whisker(&mut self, x: f64, lo: f64, hi: f64, colour: &str) {
        self.line((x, lo), (x, hi), colour, 1.2, None);
        self.line((x - 4.0, lo), (x + 4.0, lo), colour, 1.2, None);
        self.line((x - 4.0, hi), (x + 4.0, hi), colour, 1.2, None);
    }

    /// The finished document.
    pub fn finish(self) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n{}</svg>\n",
            self.body,
            w = self.w,
            h = self.h
        )
    }
}

/// "Nice" tick values covering 0..=max (1, 2 or 5 times a power of ten apart).
pub fn ticks(max: f64) -> Vec<f64> {
    if max <= 0.0 || !max.is_finite() {
        return vec![0.0, 1.0];
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| max / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let n = (max / step).ceil() as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

fn tick_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if (v * 10.0).fract().abs() < 1e-9 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A plot area inside a canvas, with a linear y axis from 0 to `y_max`.
pub struct Panel {
    /// Left edge of the plot area.
    pub x0: f64,
    /// Top edge.
    pub y0: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
    /// Top of the y scale.
    pub y_max: f64,
}

impl Panel {
    /// Canvas y of value `v`.
    pub fn y(&self, v: f64) -> f64 {
        self.y0 + self.h - (v / self.y_max).clamp(0.0, 1.05) * self.h
    }

    /// Frame, grid, y ticks, title and y axis title.
    pub fn axes(&mut self, svg: &mut Svg, title: &str, y_title: &str) {
        let t = ticks(self.y_max);
        self.y_max = t.last().copied().unwrap_or(1.0).max(f64::MIN_POSITIVE);
        for v in t {
            let y = self.y(v);
            svg.line((self.x0, y), (self.x0 + self.w, y), "#dddddd", 1.0, None);
            svg.text(self.x0 - 6.0, y + 4.0, &tick_label(v), 11.0, "end", false);
        }
        svg.line(
            (self.x0, self.y0),
            (self.x0, self.y0 + self.h),
            "#333333",
            1.0,
            None,
        );
        svg.line(
            (self.x0, self.y0 + self.h),
            (self.x0 + self.w, self.y0 + self.h),
            "#333333",
            1.0,
            None,
        );
        svg.text(
            self.x0 + self.w / 2.0,
            self.y0 - 10.0,
            title,
            13.0,
            "middle",
            true,
        );
        svg.vtext(self.x0 - 42.0, self.y0 + self.h / 2.0, y_title, 12.0);
    }
}

/// One value with its range.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    /// Median.
    pub mid: f64,
    /// Smallest sample.
    pub lo: f64,
    /// Largest sample.
    pub hi: f64,
}

/// A named series of optional points (one per x position).
pub struct Series {
    /// Points by x position.
    pub points: Vec<Option<Point>>,
}

/// A line chart panel: x positions labelled `x_labels`, one polyline with whiskers per series.
pub fn line_panel(
    svg: &mut Svg,
    mut panel: Panel,
    title: &str,
    y_title: &str,
    x_title: &str,
    x_labels: &[String],
    series: &[Series],
) {
    panel.axes(svg, title, y_title);
    let n = x_labels.len().max(1) as f64;
    let x = |i: usize| panel.x0 + panel.w * (i as f64 + 0.5) / n;
    for (i, l) in x_labels.iter().enumerate() {
        svg.text(x(i), panel.y0 + panel.h + 16.0, l, 11.0, "middle", false);
    }
    svg.text(
        panel.x0 + panel.w / 2.0,
        panel.y0 + panel.h + 34.0,
        x_title,
        12.0,
        "middle",
        false,
    );
    for (k, s) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let offset = (k as f64 - (series.len() as f64 - 1.0) / 2.0) * 5.0;
        let mut pts = Vec::new();
        for (i, p) in s.points.iter().enumerate() {
            if let Some(p) = p {
                let px = x(i) + offset;
                svg.whisker(px, panel.y(p.lo), panel.y(p.hi), colour);
                svg.circle(px, panel.y(p.mid), 3.5, colour);
                pts.push((px, panel.y(p.mid)));
            }
        }
        svg.polyline(&pts, colour, 2.0);
    }
}

/// A grouped bar panel: groups labelled `groups`, one bar per series in each group.
#[allow(clippy::too_many_arguments)]
pub fn bar_panel(
    svg: &mut Svg,
    mut panel: Panel,
    title: &str,
    y_title: &str,
    groups: &[String],
    series: &[Series],
    ref_lines: &[(f64, &str)],
) {
    panel.axes(svg, title, y_title);
    let g = groups.len().max(1) as f64;
    let group_w = panel.w / g;
    let bar_w = group_w * 0.7 / series.len().max(1) as f64;
    for (i, label) in groups.iter().enumerate() {
        let gx = panel.x0 + group_w * i as f64;
        svg.text(
            gx + group_w / 2.0,
            panel.y0 + panel.h + 16.0,
            label,
            11.0,
            "middle",
            false,
        );
        for (k, s) in series.iter().enumerate() {
            let Some(Some(p)) = s.points.get(i) else {
                continue;
            };
            let colour = COLOURS[k % COLOURS.len()];
            let bx = gx + group_w * 0.15 + bar_w * k as f64;
            let top = panel.y(p.mid);
            svg.rect(bx, top, bar_w * 0.9, panel.y0 + panel.h - top, colour, None);
            svg.whisker(bx + bar_w * 0.45, panel.y(p.lo), panel.y(p.hi), "#222222");
        }
    }
    for (v, label) in ref_lines {
        let y = panel.y(*v);
        svg.line(
            (panel.x0, y),
            (panel.x0 + panel.w, y),
            "#444444",
            1.0,
            Some("5 4"),
        );
        svg.text(panel.x0 + panel.w - 2.0, y - 3.0, label, 10.0, "end", false);
    }
}

/// The room one entry of a [`legend`] takes, swatch and gap included.
pub fn legend_width(name: &str) -> usize {
    36 + 8 * name.len()
}

/// A legend row at (`x`, `y`).
pub fn legend(svg: &mut Svg, x: f64, y: f64, names: &[String]) {
    let mut cx = x;
    for (k, name) in names.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        svg.rect(cx, y - 9.0, 12.0, 12.0, colour, None);
        svg.text(cx + 16.0, y + 1.0, name, 12.0, "start", false);
        cx += legend_width(name) as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_maximum() {
        assert_eq!(ticks(9.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(1.0);
        assert_eq!(t.len(), 6);
        assert!(
            (t[1] - 0.2).abs() < 1e-9 && (t[5] - 1.0).abs() < 1e-9,
            "{t:?}"
        );
        let t = ticks(873.0);
        assert_eq!(t.first(), Some(&0.0));
        assert!(*t.last().unwrap() >= 873.0 && t.len() <= 7, "{t:?}");
        assert_eq!(ticks(0.0), vec![0.0, 1.0]);
    }

    #[test]
    fn document_is_well_formed_and_escapes_text() {
        let mut svg = Svg::new(100.0, 50.0);
        svg.text(1.0, 2.0, "a < b & c", 10.0, "start", false);
        let doc = svg.finish();
        assert!(doc.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(doc.contains("a &lt; b &amp; c"));
        assert!(doc.trim_end().ends_with("</svg>"));
    }
}
