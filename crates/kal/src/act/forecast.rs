//! Growth and forecast: every check adds a [`Point`] to a process's [`Growth`]; a robust
//! fit over a window of points (Theil–Sen: the median of the slopes of all pairs, so one
//! outlier check cannot swing it) gives the rate at which memory grows, per process and
//! per allocation site, and the [`Forecast`] says when the process reaches the first of
//! its memory [`Limit`]s — its cgroup's `memory.max` (v2) or `memory.limit_in_bytes` (v1),
//! its `RLIMIT_AS`, or the machine's available memory — and which site is most
//! responsible. The limits are read by [`crate::act::limits`].

use crate::act::limits::{limits, vm_bytes, Limit, Measure};
use crate::act::report::Report;
use crate::reach::Kind;
use serde::Serialize;
use std::collections::HashSet;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// Points kept for the fit by default (the oldest are dropped first).
pub const DEFAULT_WINDOW: usize = 60;

/// Points needed before a rate or a forecast is given.
pub const MIN_POINTS: usize = 3;

/// Growing sites listed in a forecast.
pub const TOP_SITES: usize = 5;

/// One allocation site's bytes at one check.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteBytes {
    /// The site in one line (`function file:line`, see [`crate::attribute::site::where_`];
    /// without the agent, what the blocks are). A [`Growth`] keeps one copy of each name
    /// for all its points.
    pub site: Arc<str>,
    /// Definitely and indirectly lost bytes allocated there.
    pub lost_bytes: u64,
    /// Bytes of the live blocks allocated there that the report lists (all classes when
    /// the report lists still-reachable records, else the lost ones).
    pub live_bytes: u64,
}

/// What one check measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Seconds since the series began (monotonic).
    pub t: f64,
    /// Resident set size.
    pub rss_bytes: u64,
    /// Virtual size (what `RLIMIT_AS` limits).
    pub vm_bytes: u64,
    /// Bytes in live heap blocks.
    pub live_bytes: u64,
    /// Definitely lost bytes.
    pub direct_bytes: u64,
    /// Indirectly lost bytes.
    pub indirect_bytes: u64,
    /// Free memory the allocator keeps resident.
    pub retained_bytes: u64,
    /// Bytes kal reclaimed so far: freed, plus parked now.
    pub reclaimed_bytes: u64,
    /// Per allocation site.
    #[serde(skip)]
    pub sites: Vec<SiteBytes>,
}

/// The one-line name of a record's site.
pub fn site_name(r: &crate::act::report::Record) -> String {
    if !r.stack.is_empty() {
        return crate::attribute::site::where_(&r.stack);
    }
    match &r.contents {
        Some(c) => {
            let what = match (&c.type_name, c.block_size) {
                (Some(t), _) => t.clone(),
                (None, Some(n)) => format!("{n}-byte blocks"),
                (None, None) => "blocks".into(),
            };
            match c.points_into.first() {
                Some(p) if c.type_name.is_none() => format!("{what} pointing into {p}"),
                _ => what,
            }
        }
        None => "(no stack)".into(),
    }
}

impl Point {
    /// The point of a check's report, taken `t` seconds into the series; `vm_bytes` is the
    /// process's virtual size then.
    pub fn from_report(t: f64, r: &Report, vm_bytes: u64) -> Point {
        let mut sites: BTreeMap<String, SiteBytes> = BTreeMap::new();
        for rec in &r.leaks {
            let name = site_name(rec);
            let s = sites.entry(name.clone()).or_insert(SiteBytes {
                site: name.into(),
                lost_bytes: 0,
                live_bytes: 0,
            });
            if matches!(rec.kind, Kind::Direct | Kind::Indirect) {
                s.lost_bytes += rec.bytes;
            }
            s.live_bytes += rec.bytes;
        }
        let rc = &r.reclaimed;
        Point {
            t,
            rss_bytes: r.memory.rss_bytes,
            vm_bytes,
            live_bytes: r.memory.live_bytes,
            direct_bytes: r.summary.direct.bytes,
            indirect_bytes: r.summary.indirect.bytes,
            retained_bytes: r.memory.retained_bytes,
            reclaimed_bytes: rc.freed_bytes + rc.parked_now_bytes,
            sites: sites.into_values().collect(),
        }
    }
}

/// The Theil–Sen fit of `(x, y)` points: the median of the slopes of all pairs with
/// distinct x, and the median of `y - slope * x` as intercept. `None` with fewer than two
/// distinct x. Up to about 29 % of the points can be arbitrary without moving it far.
pub fn theil_sen(xy: &[(f64, f64)]) -> Option<(f64, f64)> {
    let mut slopes = Vec::with_capacity(xy.len() * xy.len().saturating_sub(1) / 2);
    for (i, a) in xy.iter().enumerate() {
        for b in &xy[i + 1..] {
            if b.0 != a.0 {
                slopes.push((b.1 - a.1) / (b.0 - a.0));
            }
        }
    }
    let slope = median(&mut slopes)?;
    let mut icepts: Vec<f64> = xy.iter().map(|(x, y)| y - slope * x).collect();
    Some((slope, median(&mut icepts)?))
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// How fast one site grows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteGrowth {
    /// The site in one line.
    pub site: String,
    /// Lost bytes there at the last check.
    pub lost_bytes: u64,
    /// Live bytes there at the last check (see [`SiteBytes::live_bytes`]).
    pub live_bytes: u64,
    /// Growth of its lost bytes, per second (robust fit over the window).
    pub lost_bytes_per_second: f64,
    /// Growth of its live bytes, per second.
    pub live_bytes_per_second: f64,
}

/// When the process reaches its first limit, and who is to blame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Forecast {
    /// Points in the window.
    pub points: usize,
    /// Seconds the window spans.
    pub window_seconds: f64,
    /// Growth of the RSS per second (`None` before [`MIN_POINTS`] points).
    pub rss_bytes_per_second: Option<f64>,
    /// Growth of lost bytes (direct and indirect) per second.
    pub lost_bytes_per_second: Option<f64>,
    /// Seconds until the first limit is reached from the last check; `None` when nothing
    /// grows toward a limit (or too few points); 0 when a limit is already reached.
    pub seconds_to_limit: Option<f64>,
    /// The limit reached first (when `seconds_to_limit` is given), else the tightest.
    pub limit: Option<Limit>,
    /// The site most responsible: the one whose live bytes grow fastest.
    pub site: Option<SiteGrowth>,
    /// The fastest-growing sites, fastest first (at most [`TOP_SITES`]).
    pub sites: Vec<SiteGrowth>,
}

/// A process's points over a window.
#[derive(Debug, Clone)]
pub struct Growth {
    window: usize,
    points: VecDeque<Point>,
    /// One copy of each site name (a program may have thousands of sites, each in every
    /// point of the window).
    names: HashSet<Arc<str>>,
}

impl Default for Growth {
    fn default() -> Self {
        Growth::new(DEFAULT_WINDOW)
    }
}

impl Growth {
    /// An empty series keeping the last `window` points (at least [`MIN_POINTS`]).
    pub fn new(window: usize) -> Growth {
        Growth {
            window: window.max(MIN_POINTS),
            points: VecDeque::new(),
            names: HashSet::new(),
        }
    }

    /// Adds a check's point (the oldest goes when the window is full).
    pub fn push(&mut self, mut p: Point) {
        if self.points.len() == self.window {
            self.points.pop_front();
        }
        for s in &mut p.sites {
            match self.names.get(&s.site) {
                Some(known) => s.site = known.clone(),
                None => {
                    self.names.insert(s.site.clone());
                }
            }
        }
        self.points.push_back(p);
        // Names of sites gone from the whole window go too.
        if self.names.len() > 2 * self.points.iter().map(|p| p.sites.len()).max().unwrap_or(0) + 64
        {
            let used: HashSet<&str> = self
                .points
                .iter()
                .flat_map(|p| p.sites.iter().map(|s| &*s.site))
                .collect();
            self.names.retain(|n| used.contains(&**n));
        }
    }

    /// The points, oldest first.
    pub fn points(&self) -> impl Iterator<Item = &Point> {
        self.points.iter()
    }

    /// The last point.
    pub fn last(&self) -> Option<&Point> {
        self.points.back()
    }

    /// Slope and intercept of one series over the window (`None` before [`MIN_POINTS`]).
    fn fit(&self, f: impl Fn(&Point) -> f64) -> Option<(f64, f64)> {
        if self.points.len() < MIN_POINTS {
            return None;
        }
        let xy: Vec<(f64, f64)> = self.points.iter().map(|p| (p.t, f(p))).collect();
        theil_sen(&xy)
    }

    /// Growth per second of one series over the window.
    pub fn rate(&self, f: impl Fn(&Point) -> f64) -> Option<f64> {
        self.fit(f).map(|(s, _)| s)
    }

    /// Growth of every site seen in the window, fastest-growing live bytes first (a site
    /// absent from a check had none there).
    pub fn sites(&self) -> Vec<SiteGrowth> {
        if self.points.is_empty() {
            return Vec::new();
        }
        let mut names: Vec<&str> = self
            .points
            .iter()
            .flat_map(|p| p.sites.iter().map(|s| &*s.site))
            .collect();
        names.sort_unstable();
        names.dedup();
        let index: Vec<HashMap<&str, &SiteBytes>> = self
            .points
            .iter()
            .map(|p| p.sites.iter().map(|s| (&*s.site, s)).collect())
            .collect();
        let mut out: Vec<SiteGrowth> = names
            .into_iter()
            .filter_map(|name| {
                let at = |i: usize, lost: bool| {
                    index[i]
                        .get(name)
                        .map(|s| if lost { s.lost_bytes } else { s.live_bytes })
                        .unwrap_or(0) as f64
                };
                let series = |lost: bool| -> Vec<(f64, f64)> {
                    self.points
                        .iter()
                        .enumerate()
                        .map(|(i, p)| (p.t, at(i, lost)))
                        .collect()
                };
                let (lost_rate, live_rate) = if self.points.len() < MIN_POINTS {
                    (0.0, 0.0)
                } else {
                    (theil_sen(&series(true))?.0, theil_sen(&series(false))?.0)
                };
                let now = index[index.len() - 1].get(name);
                Some(SiteGrowth {
                    site: name.to_string(),
                    lost_bytes: now.map(|s| s.lost_bytes).unwrap_or(0),
                    live_bytes: now.map(|s| s.live_bytes).unwrap_or(0),
                    lost_bytes_per_second: lost_rate,
                    live_bytes_per_second: live_rate,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            b.live_bytes_per_second
                .total_cmp(&a.live_bytes_per_second)
                .then(b.lost_bytes_per_second.total_cmp(&a.lost_bytes_per_second))
                .then(b.live_bytes.cmp(&a.live_bytes))
        });
        out
    }

    /// The forecast against `limits` (see [`limits`]), measured at the last point.
    ///
    /// For each limit the headroom is its limit less its usage, the usage first corrected
    /// by how far the last point lies off the fitted line (so one outlier at the end does
    /// not swing it either); the time is the headroom over the fitted growth of the series
    /// the limit counts (RSS, or the virtual size for `RLIMIT_AS`). The first wins.
    pub fn forecast(&self, limits: &[Limit]) -> Forecast {
        let rss = |p: &Point| p.rss_bytes as f64;
        let vm = |p: &Point| p.vm_bytes as f64;
        let fits = [(Measure::Rss, self.fit(rss)), (Measure::Vm, self.fit(vm))];
        let last = self.points.back();
        let mut best: Option<(f64, &Limit)> = None;
        let mut tightest: Option<(f64, &Limit)> = None;
        for l in limits {
            let Some((_, Some((slope, icept)))) = fits.iter().find(|(m, _)| *m == l.measure) else {
                continue;
            };
            let residual = last
                .map(|p| {
                    let y = if l.measure == Measure::Rss {
                        rss(p)
                    } else {
                        vm(p)
                    };
                    y - (icept + slope * p.t)
                })
                .unwrap_or(0.0);
            let usage = (l.usage_bytes as f64 - residual).max(0.0);
            let headroom = l.limit_bytes as f64 - usage;
            if tightest.is_none_or(|(h, _)| headroom < h) {
                tightest = Some((headroom, l));
            }
            let secs = if headroom <= 0.0 {
                0.0
            } else if *slope > 0.0 {
                headroom / slope
            } else {
                continue;
            };
            if best.is_none_or(|(s, _)| secs < s) {
                best = Some((secs, l));
            }
        }
        let sites: Vec<SiteGrowth> = self
            .sites()
            .into_iter()
            .filter(|s| s.live_bytes_per_second > 0.0 || s.lost_bytes_per_second > 0.0)
            .take(TOP_SITES)
            .collect();
        let first = self.points.front().map(|p| p.t).unwrap_or(0.0);
        Forecast {
            points: self.points.len(),
            window_seconds: last.map(|p| p.t - first).unwrap_or(0.0),
            rss_bytes_per_second: fits[0].1.map(|f| f.0),
            lost_bytes_per_second: self.rate(|p| (p.direct_bytes + p.indirect_bytes) as f64),
            seconds_to_limit: best.map(|b| b.0),
            limit: best.or(tightest).map(|b| b.1.clone()),
            site: sites.first().cloned(),
            sites,
        }
    }
}

/// Growth series of many processes (`kal run --check-every` checks every process of the
/// program; `kal watch` one), on one clock.
#[derive(Debug)]
pub struct Tracker {
    start: std::time::Instant,
    series: HashMap<i32, Growth>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new()
    }
}

impl Tracker {
    /// No series yet; time starts now.
    pub fn new() -> Tracker {
        Tracker {
            start: std::time::Instant::now(),
            series: HashMap::new(),
        }
    }

    /// Adds the point of a check of process `pid` that started `at` (its snapshot was
    /// taken then: the scan time after it must not blur the time axis), reads the
    /// process's limits now, and returns its forecast.
    pub fn observe(&mut self, pid: i32, r: &Report, at: std::time::Instant) -> Forecast {
        let t = at.saturating_duration_since(self.start).as_secs_f64();
        let g = self.series.entry(pid).or_default();
        g.push(Point::from_report(t, r, vm_bytes(pid)));
        g.forecast(&limits(pid, r.memory.rss_bytes))
    }

    /// The series of process `pid`.
    pub fn growth(&self, pid: i32) -> Option<&Growth> {
        self.series.get(&pid)
    }

    /// The processes with a series.
    pub fn pids(&self) -> Vec<i32> {
        self.series.keys().copied().collect()
    }

    /// Forgets process `pid` (it ended).
    pub fn forget(&mut self, pid: i32) {
        self.series.remove(&pid);
    }
}

/// `1.5 MiB`, `320 B`: a byte count for people.
pub fn human_bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v.abs() >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", units[0])
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// `3h12m`, `4m05s`, `12s`: a duration for people (`never` for `None`).
pub fn human_seconds(s: Option<f64>) -> String {
    let Some(s) = s else {
        return "never (not growing)".into();
    };
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86400, s / 3600 % 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: f64, rss: u64) -> Point {
        Point {
            t,
            rss_bytes: rss,
            vm_bytes: rss + 1000,
            live_bytes: rss / 2,
            direct_bytes: 0,
            indirect_bytes: 0,
            retained_bytes: 0,
            reclaimed_bytes: 0,
            sites: Vec::new(),
        }
    }

    fn limit(limit: u64, usage: u64) -> Limit {
        Limit {
            kind: "cgroup_v2",
            source: "test".into(),
            limit_bytes: limit,
            usage_bytes: usage,
            measure: Measure::Rss,
        }
    }

    #[test]
    fn theil_sen_is_exact_on_a_line_and_ignores_one_outlier() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 5.0 + 3.0 * i as f64)).collect();
        assert_eq!(theil_sen(&line), Some((3.0, 5.0)));
        let mut spiked = line.clone();
        spiked[6].1 = 1e12;
        assert_eq!(theil_sen(&spiked), Some((3.0, 5.0)));
        let mut dipped = line;
        dipped[9].1 = 0.0;
        assert_eq!(theil_sen(&dipped), Some((3.0, 5.0)));
        assert_eq!(theil_sen(&[(1.0, 2.0), (1.0, 3.0)]), None);
    }

    #[test]
    fn steady_growth_meets_the_limit_at_the_right_time() {
        let mut g = Growth::default();
        for i in 0..10 {
            g.push(point(i as f64 * 10.0, 1_000_000 + 1000 * i * 10));
        }
        // 1000 bytes/s; the cgroup has 500_000 bytes left at the last point.
        let f = g.forecast(&[limit(2_000_000, 1_500_000), limit(10_000_000, 1_090_000)]);
        assert_eq!(f.rss_bytes_per_second, Some(1000.0));
        assert_eq!(f.seconds_to_limit, Some(500.0));
        assert_eq!(f.limit.unwrap().limit_bytes, 2_000_000);
        assert_eq!(f.points, 10);
        assert_eq!(f.window_seconds, 90.0);
    }

    #[test]
    fn one_outlier_check_does_not_swing_the_forecast() {
        let mut g = Growth::default();
        for i in 0..10u64 {
            let spike = if i == 5 { 900_000_000 } else { 0 };
            g.push(point(i as f64, 1_000_000 + 1000 * i + spike));
        }
        let f = g.forecast(&[limit(2_000_000, 1_009_000)]);
        assert_eq!(f.seconds_to_limit, Some(991.0));
        // The outlier as the last point: its usage is corrected back onto the line.
        let mut g = Growth::default();
        for i in 0..10u64 {
            let spike = if i == 9 { 500_000 } else { 0 };
            g.push(point(i as f64, 1_000_000 + 1000 * i + spike));
        }
        let f = g.forecast(&[limit(2_000_000, 1_509_000)]);
        assert_eq!(f.seconds_to_limit, Some(991.0));
    }

    #[test]
    fn flat_and_shrinking_series_never_reach_a_limit() {
        for step in [0i64, -1000] {
            let mut g = Growth::default();
            for i in 0..8i64 {
                g.push(point(i as f64, (5_000_000 + step * i) as u64));
            }
            let f = g.forecast(&[limit(6_000_000, 5_000_000)]);
            assert_eq!(f.seconds_to_limit, None, "step {step}");
            assert_eq!(f.rss_bytes_per_second, Some(step as f64));
            // No limit is reached, but the tightest is still named.
            assert_eq!(f.limit.unwrap().limit_bytes, 6_000_000);
        }
    }

    #[test]
    fn too_few_points_give_no_forecast_and_a_reached_limit_gives_zero() {
        let mut g = Growth::default();
        g.push(point(0.0, 100));
        g.push(point(1.0, 200));
        assert_eq!(g.forecast(&[limit(1000, 200)]).seconds_to_limit, None);
        g.push(point(2.0, 300));
        assert_eq!(g.forecast(&[limit(1000, 300)]).seconds_to_limit, Some(7.0));
        assert_eq!(g.forecast(&[limit(250, 300)]).seconds_to_limit, Some(0.0));
    }

    #[test]
    fn the_window_drops_old_points() {
        let mut g = Growth::new(4);
        // Shrinking first, then growing 10 bytes/s: only the growth is in the window.
        for (t, rss) in [(0, 900), (1, 800), (2, 700), (3, 710), (4, 720), (5, 730)] {
            g.push(point(t as f64, rss));
        }
        assert_eq!(g.points().count(), 4);
        assert_eq!(g.forecast(&[]).rss_bytes_per_second, Some(10.0));
    }

    #[test]
    fn the_fastest_growing_site_is_named() {
        let mut g = Growth::default();
        for i in 0..6u64 {
            let mut p = point(i as f64, 1_000_000 + 5000 * i);
            p.sites = vec![
                SiteBytes {
                    site: "leak a.c:10".into(),
                    lost_bytes: 4000 * i,
                    live_bytes: 4000 * i,
                },
                SiteBytes {
                    site: "steady b.c:20".into(),
                    lost_bytes: 0,
                    live_bytes: 50_000,
                },
            ];
            if i >= 2 {
                // A site that appears later, growing slower.
                p.sites.push(SiteBytes {
                    site: "late c.c:30".into(),
                    lost_bytes: 0,
                    live_bytes: 1000 * i,
                });
            }
            g.push(p);
        }
        let f = g.forecast(&[limit(2_000_000, 1_025_000)]);
        let site = f.site.unwrap();
        assert_eq!(site.site, "leak a.c:10");
        assert_eq!(site.lost_bytes_per_second, 4000.0);
        assert_eq!(site.lost_bytes, 20_000);
        // The steady site is not growing: not listed.
        let names: Vec<&str> = f.sites.iter().map(|s| s.site.as_str()).collect();
        assert_eq!(names, ["leak a.c:10", "late c.c:30"]);
        assert_eq!(f.seconds_to_limit, Some(195.0));
    }

    #[test]
    fn site_names_are_kept_once() {
        let mut g = Growth::new(3);
        for i in 0..5u64 {
            let mut p = point(i as f64, 1000);
            p.sites = vec![SiteBytes {
                site: if i < 4 { "a.c:1" } else { "b.c:2" }.into(),
                lost_bytes: i,
                live_bytes: i,
            }];
            g.push(p);
        }
        let names: Vec<&Arc<str>> = g.points().map(|p| &p.sites[0].site).collect();
        assert!(Arc::ptr_eq(names[0], names[1]));
        assert_eq!(&*names[2].clone(), "b.c:2");
    }

    #[test]
    fn people_read_sizes_and_durations() {
        assert_eq!(human_bytes(320.0), "320 B");
        assert_eq!(human_bytes(1.5 * 1048576.0), "1.5 MiB");
        assert_eq!(human_seconds(Some(42.4)), "42s");
        assert_eq!(human_seconds(Some(245.0)), "4m05s");
        assert_eq!(human_seconds(Some(3.0 * 3600.0 + 720.0)), "3h12m");
        assert_eq!(human_seconds(None), "never (not growing)");
    }
}
