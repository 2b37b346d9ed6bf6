//! `moeshift plan`: compute an expert placement from a load file and print it.
//!
//! Bad input (unreadable or malformed files, ragged rows, invalid loads, violated divisibility
//! constraints, an old placement that does not fit, inconsistent options) ends with exit code 2
//! and one line on stderr.

use moeshift_placement::{
    rebalance, Balancedness, Layout, LoadMatrix, MigrationOptions, Placement, Policy, Topology,
};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `moeshift plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// JSON load file: an array of rows (layers × logical experts), or an object whose key
    /// "weights" holds that array.
    #[arg(long, value_name = "FILE")]
    load: PathBuf,
    /// Physical expert slots per layer (logical experts plus redundant ones).
    #[arg(long, value_name = "R")]
    replicas: usize,
    /// Expert groups of the model (group-limited routing).
    #[arg(long, value_name = "G")]
    groups: usize,
    /// Nodes; GPUs are split evenly into contiguous blocks, one per node.
    #[arg(long, value_name = "N")]
    nodes: usize,
    /// GPUs (ranks) of the expert-parallel group.
    #[arg(long, value_name = "P")]
    gpus: usize,
    /// Placement policy.
    #[arg(long, value_enum, default_value_t = PolicyName::Deepseek)]
    policy: PolicyName,
    /// JSON file with the current placement: an array of phy2log rows, one per layer.
    #[arg(long, value_name = "FILE")]
    old: Option<PathBuf>,
    /// Migration policy: most replicas moved per layer.
    #[arg(long, value_name = "K")]
    max_moves: Option<usize>,
    /// Migration policy: how far below the fresh DeepSeek plan's balancedness a layer may stay
    /// (absolute, default 0.01).
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    tolerance: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Write an SVG chart of the per-rank load before and after to this file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// Placement policies `moeshift plan` offers.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum PolicyName {
    /// DeepSeek's EPLB (hierarchical when groups % nodes == 0, otherwise global).
    Deepseek,
    /// Reach the fresh DeepSeek plan's balancedness while moving few replicas (needs --old).
    Migration,
}

/// Output formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// One JSON object: phy2log, logcnt, log2phy, balancedness and moved per layer.
    Json,
    /// A readable per-layer, per-rank table.
    Table,
}

/// Input the user has to fix: reported on one line, exit code 2.
struct BadInput(String);

impl<E: std::fmt::Display> From<E> for BadInput {
    fn from(e: E) -> Self {
        BadInput(e.to_string())
    }
}

/// Runs `moeshift plan`.
pub fn run(args: PlanArgs) -> anyhow::Result<ExitCode> {
    match plan(&args) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(BadInput(msg)) => {
            // One line, whatever the underlying error printed.
            let line = msg.split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("moeshift plan: {line}");
            Ok(ExitCode::from(2))
        }
    }
}

/// Sizes beyond any real model; larger requests are refused instead of exhausting memory.
const MAX_SLOTS_PER_LAYER: usize = 1 << 20;
const MAX_TABLE_ENTRIES: usize = 1 << 28;

fn plan(args: &PlanArgs) -> Result<(), BadInput> {
    let load = read_load(&args.load)?;
    let too_large = args.replicas > MAX_SLOTS_PER_LAYER
        || load.num_layers().saturating_mul(args.replicas) > MAX_TABLE_ENTRIES
        || load.num_experts().saturating_mul(args.gpus) > MAX_TABLE_ENTRIES;
    if too_large {
        return Err(BadInput(format!(
            "{} layers x {} slots on {} GPUs for {} experts is larger than moeshift plan handles \
             (at most {MAX_SLOTS_PER_LAYER} slots per layer)",
            load.num_layers(),
            args.replicas,
            args.gpus,
            load.num_experts()
        )));
    }
    let topo = Topology::new(args.replicas, args.groups, args.nodes, args.gpus);
    let old = match &args.old {
        Some(path) => Some(read_old(
            path,
            load.num_experts(),
            args.replicas,
            args.gpus,
        )?),
        None => None,
    };
    let policy = match args.policy {
        PolicyName::Deepseek => {
            if args.max_moves.is_some() || args.tolerance.is_some() {
                return Err(BadInput(
                    "--max-moves and --tolerance only apply to --policy migration".into(),
                ));
            }
            Policy::DeepSeek
        }
        PolicyName::Migration => {
            if old.is_none() {
                return Err(BadInput(
                    "--policy migration needs the current placement (--old FILE)".into(),
                ));
            }
            let mut options = MigrationOptions::default();
            if let Some(t) = args.tolerance {
                options.tolerance = t;
            }
            options.max_moves = args.max_moves;
            Policy::Migration(options)
        }
    };
    let result = rebalance(&policy, &load, &topo, old.as_ref())?;
    let after = result.placement.balancedness(&load)?;
    let before_placement = match &old {
        Some(p) => p.clone(),
        None => Placement::initial(Layout::new(
            load.num_layers(),
            load.num_experts(),
            args.replicas,
            args.gpus,
        )?),
    };
    let before = before_placement.balancedness(&load)?;

    let out = match args.format {
        Format::Json => {
            let mut v = serde_json::to_value(&result.placement)?;
            if let Value::Object(map) = &mut v {
                map.insert(
                    "balancedness".into(),
                    serde_json::to_value(&after.per_layer)?,
                );
                map.insert("moved".into(), serde_json::to_value(&result.moved)?);
            }
            format!("{v}\n")
        }
        Format::Table => table(
            args,
            &policy,
            &load,
            &result.placement,
            &before_placement,
            (&before, &after),
            &result.moved,
        )?,
    };
    print!("{out}");

    if let Some(path) = &args.plot {
        let sums = |p: &Placement| -> Result<Vec<f64>, BadInput> {
            let loads = p.rank_loads(&load)?;
            let mut per_rank = vec![0.0; args.gpus];
            for layer in loads.chunks_exact(args.gpus) {
                for (acc, x) in per_rank.iter_mut().zip(layer) {
                    *acc += x;
                }
            }
            Ok(per_rank)
        };
        let title = format!(
            "moeshift plan --policy {}: per-rank load, summed over {} layers",
            policy.name(),
            load.num_layers()
        );
        let svg = svg_chart(
            &title,
            &sums(&before_placement)?,
            &sums(&result.placement)?,
            if old.is_some() {
                "old placement"
            } else {
                "initial placement"
            },
        );
        std::fs::write(path, svg)
            .map_err(|e| BadInput(format!("cannot write plot file {}: {e}", path.display())))?;
    }
    Ok(())
}

fn read_json(path: &Path, what: &str) -> Result<Value, BadInput> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadInput(format!("cannot read {what} file {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| {
        BadInput(format!(
            "{what} file {} is not valid JSON: {e}",
            path.display()
        ))
    })
}

fn read_load(path: &Path) -> Result<LoadMatrix, BadInput> {
    let v = read_json(path, "load")?;
    let rows = match &v {
        Value::Array(rows) => rows,
        Value::Object(map) => match map.get("weights") {
            Some(Value::Array(rows)) => rows,
            _ => {
                return Err(BadInput(format!(
                    "load file {}: the object has no array under key \"weights\"",
                    path.display()
                )))
            }
        },
        _ => {
            return Err(BadInput(format!(
                "load file {} must hold an array of rows or an object with key \"weights\"",
                path.display()
            )))
        }
    };
    let mut out = Vec::with_capacity(rows.len());
    for (layer, row) in rows.iter().enumerate() {
        let Value::Array(row) = row else {
            return Err(BadInput(format!(
                "load row of layer {layer} is not an array"
            )));
        };
        let mut values = Vec::with_capacity(row.len());
        for (expert, x) in row.iter().enumerate() {
            values.push(x.as_f64().ok_or_else(|| {
                BadInput(format!(
                    "load of layer {layer}, expert {expert} is not a number: {x}"
                ))
            })?);
        }
        out.push(values);
    }
    Ok(LoadMatrix::from_f64_rows(&out)?)
}

fn read_old(
    path: &Path,
    experts: usize,
    replicas: usize,
    gpus: usize,
) -> Result<Placement, BadInput> {
    let v = read_json(path, "old placement")?;
    let Value::Array(rows) = &v else {
        return Err(BadInput(format!(
            "old placement file {} must hold an array of phy2log rows",
            path.display()
        )));
    };
    let mut out = Vec::with_capacity(rows.len());
    for (layer, row) in rows.iter().enumerate() {
        let Value::Array(row) = row else {
            return Err(BadInput(format!(
                "old placement row of layer {layer} is not an array"
            )));
        };
        if row.len() != replicas {
            return Err(BadInput(format!(
                "old placement row of layer {layer} has {} slots, but --replicas is {replicas}",
                row.len()
            )));
        }
        let mut ids = Vec::with_capacity(row.len());
        for (slot, x) in row.iter().enumerate() {
            let id = x
                .as_u64()
                .and_then(|id| usize::try_from(id).ok())
                .ok_or_else(|| {
                    BadInput(format!(
                        "old placement of layer {layer}, slot {slot} is not an expert id \
                         (a non-negative integer): {x}"
                    ))
                })?;
            ids.push(id);
        }
        out.push(ids);
    }
    Placement::from_rows(experts, gpus, &out).map_err(|e| BadInput(format!("old placement: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn table(
    args: &PlanArgs,
    policy: &Policy,
    load: &LoadMatrix,
    plan: &Placement,
    before_placement: &Placement,
    (before, after): (&Balancedness, &Balancedness),
    moved: &[usize],
) -> Result<String, BadInput> {
    let topo = Topology::new(args.replicas, args.groups, args.nodes, args.gpus);
    let mode = match policy {
        Policy::DeepSeek if topo.is_hierarchical() => "hierarchical",
        Policy::DeepSeek => "global",
        Policy::Migration(_) => "migration-aware",
    };
    let before_name = if args.old.is_some() { "old" } else { "initial" };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "policy {} ({mode}): {} layers, {} logical experts, {} slots on {} GPUs ({} nodes, {} groups)",
        policy.name(),
        load.num_layers(),
        load.num_experts(),
        args.replicas,
        args.gpus,
        args.nodes,
        args.groups
    );
    let _ = write!(
        s,
        "balancedness (sum of means / sum of maxima over layers): {:.4} ({before_name} placement {:.4})",
        after.overall, before.overall,
    );
    if args.old.is_some() {
        let _ = write!(s, "; moved replicas {}", moved.iter().sum::<usize>());
    }
    s.push('\n');
    let loads = plan.rank_loads(load)?;
    let old_loads = before_placement.rank_loads(load)?;
    let ranks_per_node = (args.gpus / args.nodes.max(1)).max(1);
    for layer in 0..load.num_layers() {
        let _ = write!(
            s,
            "\nlayer {layer}: balancedness {:.4} ({before_name} {:.4})",
            after.per_layer.get(layer).copied().unwrap_or(0.0),
            before.per_layer.get(layer).copied().unwrap_or(0.0),
        );
        if args.old.is_some() {
            let _ = write!(s, ", moved {}", moved.get(layer).copied().unwrap_or(0));
        }
        s.push('\n');
        let _ = writeln!(
            s,
            "  {:>5} {:>5} {:>12} {:>12}  experts",
            "rank", "node", "load", before_name
        );
        for rank in 0..args.gpus {
            let experts = plan
                .rank_slots(layer, rank)
                .unwrap_or(&[])
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(" ");
            let idx = layer * args.gpus + rank;
            let _ = writeln!(
                s,
                "  {rank:>5} {:>5} {:>12.1} {:>12.1}  {experts}",
                rank / ranks_per_node,
                loads.get(idx).copied().unwrap_or(0.0),
                old_loads.get(idx).copied().unwrap_or(0.0),
            );
        }
    }
    Ok(s)
}

/// A grouped bar chart of per-rank load before and after, written by hand (no plotting
/// dependency): one pair of bars per rank, a dashed line at the mean, a legend.
fn svg_chart(title: &str, before: &[f64], after: &[f64], before_label: &str) -> String {
    let ranks = before.len().max(after.len()).max(1);
    let (left, right, top, bottom) = (70.0, 20.0, 50.0, 50.0);
    let plot_w = (ranks as f64 * 28.0).max(480.0);
    let plot_h = 280.0;
    let width = left + plot_w + right;
    let height = top + plot_h + bottom;
    let max = before
        .iter()
        .chain(after)
        .copied()
        .filter(|x| x.is_finite())
        .fold(0.0f64, f64::max);
    let y_max = nice_ceiling(if max > 0.0 { max * 1.05 } else { 1.0 });
    let y = |v: f64| top + plot_h - (v / y_max) * plot_h;
    let group = plot_w / ranks as f64;
    let bar = (group * 0.38).min(14.0);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="14">{}</text>"#,
        width / 2.0,
        xml_escape(title)
    );
    // Grid and y labels.
    for k in 0..=5 {
        let v = y_max * k as f64 / 5.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#dddddd"/>"##,
            left + plot_w
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            yy + 4.0,
            format_tick(v)
        );
    }
    // Bars.
    for r in 0..ranks {
        let x0 = left + group * r as f64 + group / 2.0 - bar;
        for (k, (values, color)) in [(before, "#9e9e9e"), (after, "#1f77b4")].iter().enumerate() {
            let v = values.get(r).copied().unwrap_or(0.0).max(0.0);
            let yy = y(v);
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{yy:.1}" width="{bar:.1}" height="{:.1}" fill="{color}"/>"#,
                x0 + bar * k as f64,
                top + plot_h - yy
            );
        }
        if ranks <= 64 || r % (ranks / 32).max(1) == 0 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{r}</text>"#,
                left + group * r as f64 + group / 2.0,
                top + plot_h + 14.0
            );
        }
    }
    // Mean line (the same for both: moving replicas does not change the total).
    let mean = after.iter().sum::<f64>() / ranks as f64;
    let ym = y(mean);
    let _ = writeln!(
        s,
        r#"<line x1="{left:.1}" y1="{ym:.1}" x2="{:.1}" y2="{ym:.1}" stroke="black" stroke-dasharray="5,4"/>"#,
        left + plot_w
    );
    // Axes and labels.
    let _ = writeln!(
        s,
        r#"<line x1="{left:.1}" y1="{top:.1}" x2="{left:.1}" y2="{:.1}" stroke="black"/>"#,
        top + plot_h
    );
    let _ = writeln!(
        s,
        r#"<line x1="{left:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        top + plot_h,
        left + plot_w,
        top + plot_h
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">rank</text>"#,
        left + plot_w / 2.0,
        height - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">load</text>"#,
        top + plot_h / 2.0,
        top + plot_h / 2.0
    );
    // Legend.
    let lx = left + plot_w - 250.0;
    for (k, (label, color)) in [(before_label, "#9e9e9e"), ("new placement", "#1f77b4")]
        .iter()
        .enumerate()
    {
        let ly = top - 18.0 + 14.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            ly - 9.0,
            lx + 14.0,
            ly,
            xml_escape(label)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}">- - mean</text>"#,
        lx + 140.0,
        top - 18.0
    );
    s.push_str("</svg>\n");
    s
}

/// The smallest 1, 2 or 5 × 10^k at or above `x` (> 0).
fn nice_ceiling(x: f64) -> f64 {
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&v| v >= x)
        .unwrap_or(10.0 * p)
}

fn format_tick(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e6 || v.abs() < 1e-2) {
        format!("{v:.1e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceiling_rounds_up_to_1_2_5() {
        assert_eq!(nice_ceiling(0.9), 1.0);
        assert_eq!(nice_ceiling(1.5), 2.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(730.0), 1000.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
    }

    #[test]
    fn svg_has_a_bar_pair_per_rank() {
        let svg = svg_chart(
            "t <&>",
            &[1.0, 2.0, 3.0],
            &[2.0, 2.0, 2.0],
            "initial placement",
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        // 3 ranks × 2 bars, plus the background and two legend swatches.
        assert_eq!(svg.matches("<rect").count(), 3 * 2 + 1 + 2);
        assert!(svg.contains("t &lt;&amp;&gt;"));
    }
}
