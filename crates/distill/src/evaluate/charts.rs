//! SVG charts for reports: training loss per stage, dollars per stage, and held-out
//! accuracy against the cumulative dollars of each arm.
//!
//! plotters is built without its `ttf` feature (font-kit needs fontconfig),
//! so it estimates text extents itself and the SVG backend writes labels as
//! `<text>` elements for the viewer to render; nothing is rasterised here.

use std::ops::Range;

use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};

const SIZE: (u32, u32) = (800, 480);

/// Tableau 10 (Tableau's default categorical palette since 2016): ten hues
/// that stay apart on white. Series past the tenth reuse them in order.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4E, 0x79, 0xA7),
    RGBColor(0xF2, 0x8E, 0x2B),
    RGBColor(0xE1, 0x57, 0x59),
    RGBColor(0x76, 0xB7, 0xB2),
    RGBColor(0x59, 0xA1, 0x4F),
    RGBColor(0xED, 0xC9, 0x48),
    RGBColor(0xB0, 0x7A, 0xA1),
    RGBColor(0xFF, 0x9D, 0xA7),
    RGBColor(0x9C, 0x75, 0x5F),
    RGBColor(0xBA, 0xB0, 0xAC),
];

/// The colour of the `i`-th series or bar.
fn series_color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> Error {
    Error::Invalid(format!("chart: drawing failed: {e}"))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// One line per stage, training step against loss. The y axis is logarithmic
/// when every loss is positive (losses fall by orders of magnitude early on),
/// linear otherwise. Non-finite points are skipped; a series with no finite
/// point, or no series at all, is an error.
pub fn loss_curves_svg(series: &[(String, Vec<(usize, f64)>)]) -> Result<String> {
    if series.is_empty() {
        return Err(Error::Invalid(
            "loss chart: no series given; pass at least one stage's (step, loss) points".into(),
        ));
    }
    let clean: Vec<(&str, Vec<(usize, f64)>)> = series
        .iter()
        .map(|(name, pts)| {
            let pts: Vec<(usize, f64)> = pts.iter().copied().filter(|(_, l)| l.is_finite()).collect();
            if pts.is_empty() {
                Err(Error::Invalid(format!(
                    "loss chart: series {name:?} has no finite (step, loss) point; leave it out"
                )))
            } else {
                Ok((name.as_str(), pts))
            }
        })
        .collect::<Result<_>>()?;
    let all = || clean.iter().flat_map(|(_, p)| p.iter());
    let (x_lo, x_hi) = all().fold((usize::MAX, 0), |(lo, hi), &(s, _)| (lo.min(s), hi.max(s)));
    let (y_lo, y_hi) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, l)| {
        (lo.min(l), hi.max(l))
    });
    let x = x_lo..x_hi.max(x_lo + 1);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        if y_lo > 0.0 {
            // A 20% margin (in ratio) keeps both ends of the curves off the frame.
            draw_lines(
                &root,
                &clean,
                x,
                (y_lo / 1.2..y_hi * 1.2).log_scale(),
                "loss (log scale)",
            )?;
        } else {
            let pad = if y_hi > y_lo { 0.05 * (y_hi - y_lo) } else { 1.0 };
            draw_lines(&root, &clean, x, y_lo - pad..y_hi + pad, "loss")?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn draw_lines<Y>(root: &Area, series: &[(&str, Vec<(usize, f64)>)], x: Range<usize>, y: Y, y_desc: &str) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(root)
        .caption("training loss", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .y_label_formatter(&|v| tick(*v))
        .light_line_style(WHITE)
        .draw()
        .map_err(draw_err)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = series_color(i);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(draw_err)?
            .label(*name)
            // A filled swatch, not a line, so the only polyline in a series' colour is its curve.
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// An axis tick or amount with at most four significant digits ("0.3", not
/// "0.30000000000000004"; "0.00575", not "5.75e-3").
fn tick(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return v.to_string();
    }
    let mag = v.abs().log10().floor();
    if !(-6.0..5.0).contains(&mag) {
        return format!("{v:.1e}");
    }
    let decimals = (3.0 - mag).max(0.0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// "$294.7K", "$2.5M", "$12.5", "$0.00575": CPU runs cost fractions of a cent.
fn dollars(x: f64) -> String {
    if x >= 1e6 {
        format!("${}M", tick(x / 1e6))
    } else if x >= 1e3 {
        format!("${}K", tick(x / 1e3))
    } else {
        format!("${}", tick(x))
    }
}

/// One line per arm: held-out accuracy (percent) against the cumulative dollars spent
/// on the arm. Arms with no point are left out; none at all is an error.
pub fn accuracy_curves_svg(arms: &[(String, Vec<(f64, f64)>)]) -> Result<String> {
    let arms: Vec<&(String, Vec<(f64, f64)>)> = arms.iter().filter(|(_, p)| !p.is_empty()).collect();
    if arms.is_empty() {
        return Err(Error::Invalid("accuracy chart: no arm has an accuracy point".into()));
    }
    let all = || arms.iter().flat_map(|(_, p)| p.iter());
    if let Some((d, a)) = all().find(|(d, a)| !(d.is_finite() && a.is_finite() && *d >= 0.0)) {
        return Err(Error::Invalid(format!(
            "accuracy chart: the point ({d}, {a}) is not a finite cost and accuracy"
        )));
    }
    let x_hi = all().map(|(d, _)| *d).fold(0.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("held-out accuracy against dollars spent", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..(x_hi * 1.05).max(1e-9), 0.0..100.0)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("cumulative dollars of the arm")
            .y_desc("accuracy (%)")
            .x_label_formatter(&|d| dollars(*d))
            .light_line_style(WHITE)
            .draw()
            .map_err(draw_err)?;
        for (i, (name, pts)) in arms.iter().enumerate() {
            let color = series_color(i);
            let pts: Vec<(f64, f64)> = pts.iter().map(|(d, a)| (*d, 100.0 * a)).collect();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(draw_err)?
                .label(name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
                .map_err(draw_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// A bar per stage, its height the stage's dollars, the amount written above it.
pub fn cost_bars_svg(stages: &[(String, f64)]) -> Result<String> {
    if stages.is_empty() {
        return Err(Error::Invalid(
            "cost chart: no stages given; pass at least one (stage, dollars) pair".into(),
        ));
    }
    if let Some((name, d)) = stages.iter().find(|(_, d)| !(d.is_finite() && *d >= 0.0)) {
        return Err(Error::Invalid(format!(
            "cost chart: stage {name:?} costs {d} dollars; a cost must be a non-negative number"
        )));
    }
    let max = stages.iter().map(|(_, d)| *d).fold(0.0, f64::max);
    let top = if max > 0.0 { max * 1.15 } else { 1.0 };
    let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
    let label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => names.get(*i).map_or_else(String::new, |n| n.to_string()),
        _ => String::new(),
    };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("cost per stage", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(72)
            // A discrete usize range includes its end: 0..n - 1 is n slots.
            .build_cartesian_2d((0..stages.len() - 1).into_segmented(), 0.0..top)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(stages.len())
            .x_label_formatter(&label)
            .y_desc("dollars")
            .y_label_formatter(&|d| dollars(*d))
            .draw()
            .map_err(draw_err)?;
        chart
            .draw_series(stages.iter().enumerate().map(|(i, (_, d))| {
                let mut bar = Rectangle::new(
                    [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *d)],
                    series_color(i).filled(),
                );
                bar.set_margin(0, 0, 12, 12);
                bar
            }))
            .map_err(draw_err)?;
        let text = ("sans-serif", 14)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        chart
            .draw_series(
                stages
                    .iter()
                    .enumerate()
                    .map(|(i, (_, d))| Text::new(dollars(*d), (SegmentValue::CenterOf(i), *d), text.clone())),
            )
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    fn parse(svg: &str) -> roxmltree::Document<'_> {
        match roxmltree::Document::parse(svg) {
            Ok(d) => d,
            Err(e) => panic!("not well-formed XML: {e}\n{svg}"),
        }
    }

    fn texts(doc: &roxmltree::Document) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_string()))
            .collect()
    }

    #[test]
    fn loss_chart_has_a_curve_and_a_label_per_stage() -> Result<()> {
        let series = vec![
            (
                "teacher".to_string(),
                (0..50).map(|s| (s * 10, 5.0 / (1.0 + s as f64))).collect(),
            ),
            (
                "student".to_string(),
                (0..30).map(|s| (s * 10, 4.0 / (1.0 + s as f64))).collect(),
            ),
            // Escaped in the SVG, read back intact.
            ("a<b & \"c\"".to_string(), vec![(0, 3.0), (100, f64::NAN), (200, 1.0)]),
        ];
        let svg = loss_curves_svg(&series)?;
        let doc = parse(&svg);
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        for (i, (_, pts)) in series.iter().enumerate() {
            let color = hex(series_color(i));
            let curves: Vec<_> = doc
                .descendants()
                .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(color.as_str()))
                .collect();
            assert_eq!(curves.len(), 1, "series {i}");
            // One vertex per finite point.
            let finite = pts.iter().filter(|(_, l)| l.is_finite()).count();
            let vertices = curves[0].attribute("points").unwrap_or("").split_whitespace().count();
            assert_eq!(vertices, finite, "series {i}");
        }
        let t = texts(&doc);
        for name in [
            "teacher",
            "student",
            "a<b & \"c\"",
            "step",
            "loss (log scale)",
            "training loss",
        ] {
            assert!(t.iter().any(|s| s == name), "{name:?} missing from {t:?}");
        }
        Ok(())
    }

    #[test]
    fn loss_chart_goes_linear_for_non_positive_losses_and_rejects_empty_input() -> Result<()> {
        let svg = loss_curves_svg(&[("kd".to_string(), vec![(0, 0.0), (1, -0.5), (2, 0.25)])])?;
        let doc = parse(&svg);
        assert!(texts(&doc).iter().any(|s| s == "loss"));
        assert!(!svg.contains("log scale"));
        // A single point still gets a (degenerate) axis range.
        let doc_svg = loss_curves_svg(&[("one".to_string(), vec![(7, 2.0)])])?;
        parse(&doc_svg);

        assert!(loss_curves_svg(&[]).is_err());
        let err = loss_curves_svg(&[("x".to_string(), vec![(0, f64::INFINITY)])])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"x\"") && err.contains("leave it out"), "{err}");
        Ok(())
    }

    #[test]
    fn cost_chart_has_a_bar_and_amount_per_stage() -> Result<()> {
        let stages = vec![
            ("DeepSeek-R1-Zero".to_string(), 202_752.0),
            ("SFT data creation".to_string(), 10_000.0),
            ("DeepSeek-R1".to_string(), 81_920.0),
            ("eval".to_string(), 0.0),
        ];
        let svg = cost_bars_svg(&stages)?;
        let doc = parse(&svg);
        let rects = |color: &str| {
            doc.descendants()
                .filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some(color))
                .count()
        };
        for i in 0..3 {
            assert_eq!(rects(&hex(series_color(i))), 1, "bar {i}");
        }
        // Bar heights follow the dollars: R1-Zero's is the tallest.
        let height = |i: usize| -> f64 {
            let color = hex(series_color(i));
            doc.descendants()
                .find(|n| n.has_tag_name("rect") && n.attribute("fill") == Some(color.as_str()))
                .and_then(|n| n.attribute("height"))
                .and_then(|h| h.parse().ok())
                .unwrap_or(0.0)
        };
        assert!(height(0) > height(2) && height(2) > height(1) && height(1) > 0.0);
        let t = texts(&doc);
        for (name, _) in &stages {
            assert!(t.iter().any(|s| s == name), "{name:?} missing from {t:?}");
        }
        for amount in ["$202.8K", "$10K", "$81.92K", "$0"] {
            assert!(t.iter().any(|s| s == amount), "{amount} missing from {t:?}");
        }

        // One stage: one slot, one bar.
        let one = cost_bars_svg(&[("only".to_string(), 3.0)])?;
        let doc = parse(&one);
        let bars = doc
            .descendants()
            .filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some(hex(series_color(0)).as_str()))
            .count();
        assert_eq!(bars, 1);
        assert!(texts(&doc).iter().any(|s| s == "only"));
        Ok(())
    }

    #[test]
    fn cost_chart_rejects_bad_amounts() {
        assert!(cost_bars_svg(&[]).is_err());
        let err = cost_bars_svg(&[("s".to_string(), -1.0)]).unwrap_err().to_string();
        assert!(err.contains("\"s\"") && err.contains("non-negative"), "{err}");
        assert!(cost_bars_svg(&[("s".to_string(), f64::NAN)]).is_err());
    }

    #[test]
    fn accuracy_chart_has_a_line_per_arm_with_points() -> Result<()> {
        let arms = vec![
            ("student".to_string(), vec![(0.5, 0.2), (1.0, 0.4)]),
            ("student-rl".to_string(), vec![(0.1, 0.1), (0.3, 0.15), (0.6, 0.2)]),
            ("oracle".to_string(), vec![]),
        ];
        let svg = accuracy_curves_svg(&arms)?;
        let doc = parse(&svg);
        let t = texts(&doc);
        assert!(
            t.iter().any(|x| x == "student") && t.iter().any(|x| x == "student-rl"),
            "{t:?}"
        );
        assert!(!t.iter().any(|x| x == "oracle"), "an arm with no point is drawn");
        let lines = doc.descendants().filter(|n| n.has_tag_name("polyline")).count();
        assert!(lines >= 2, "{lines} polylines");
        let dots = doc.descendants().filter(|n| n.has_tag_name("circle")).count();
        assert_eq!(dots, 5);
        assert!(accuracy_curves_svg(&arms[2..]).is_err());
        assert!(accuracy_curves_svg(&[("x".into(), vec![(f64::NAN, 0.1)])]).is_err());
        Ok(())
    }

    #[test]
    fn tick_labels() {
        assert_eq!(tick(0.30000000000000004), "0.3");
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(12.5), "12.5");
        assert_eq!(tick(1234.5678), "1235");
        assert_eq!(tick(0.012345), "0.01235");
        assert_eq!(tick(123456.0), "1.2e5");
        assert_eq!(tick(0.0000109), "0.0000109");
        assert_eq!(tick(-0.25), "-0.25");
        assert_eq!(tick(0.0), "0");
    }

    #[test]
    fn dollar_labels() {
        assert_eq!(dollars(294_672.0), "$294.7K");
        assert_eq!(dollars(10_000.0), "$10K");
        assert_eq!(dollars(2.5e6), "$2.5M");
        assert_eq!(dollars(12.5), "$12.5");
        assert_eq!(dollars(0.00575), "$0.00575");
        assert_eq!(dollars(0.0), "$0");
    }
}
