//! Prometheus metrics: what each check found, served at `/metrics` in the text exposition
//! format (OpenMetrics, which Prometheus asks for first) by [`serve`]. A check updates the
//! metrics ([`Metrics::observe`]); the server thread only reads them, so a scrape never
//! holds a check up, and nothing runs in the target between checks.
//!
//! Every series has a `pid` label. Names (see README, "Prometheus metrics"):
//! `kal_rss_bytes`, `kal_vm_bytes`, `kal_live_bytes`, `kal_lost_bytes{class}`,
//! `kal_lost_blocks{class}` (class `direct`, `indirect`, `possible`), `kal_retained_bytes`,
//! `kal_reclaimed_bytes{how}` (`parked` now, `freed` and `restored` so far),
//! `kal_pause_seconds` and `kal_scan_seconds` (histograms), `kal_checks_total`,
//! `kal_rss_growth_bytes_per_second`, `kal_forecast_seconds{limit}` (seconds to the first
//! memory limit; `+Inf` when nothing grows toward one), `kal_limit_bytes{limit}`, and
//! `kal_site_lost_bytes{site}` for the top sites by lost bytes plus `site="other"`.

use crate::act::forecast::{Forecast, MIN_POINTS};
use crate::act::report::Report;
use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Sites with their own `kal_site_lost_bytes` series, by default; the rest are summed
/// under `site="other"`.
pub const TOP_SITES: usize = 10;

type Labels = Vec<(String, String)>;
type Ints = Family<Labels, Gauge>;
type Floats = Family<Labels, Gauge<f64, AtomicU64>>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// The metrics of every process kal checks, in one registry.
pub struct Metrics {
    registry: Registry,
    rss: Ints,
    vm: Ints,
    live: Ints,
    lost: Ints,
    lost_blocks: Ints,
    retained: Ints,
    reclaimed: Ints,
    pause: Histograms,
    scan: Histograms,
    checks: Family<Labels, Counter>,
    growth: Floats,
    forecast: Floats,
    limit: Ints,
    sites: Ints,
    top: usize,
    /// Per process: the label sets of its `kal_site_lost_bytes` and of its forecast and
    /// limit series, which change from check to check (stale ones are removed).
    changing: std::sync::Mutex<std::collections::HashMap<i32, Changing>>,
}

/// Label sets of one process's series whose labels change.
#[derive(Default)]
struct Changing {
    sites: Vec<Labels>,
    limit: Option<Labels>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("top", &self.top).finish()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(TOP_SITES)
    }
}

fn labels(pid: i32, extra: &[(&str, &str)]) -> Labels {
    std::iter::once(("pid".to_string(), pid.to_string()))
        .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

impl Metrics {
    /// Empty metrics, with `top` sites named in `kal_site_lost_bytes`.
    pub fn new(top: usize) -> Metrics {
        let mut registry = Registry::with_prefix("kal");
        let ints = || Ints::default();
        let hist = || Histograms::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let m = Metrics {
            registry: Registry::default(),
            rss: ints(),
            vm: ints(),
            live: ints(),
            lost: ints(),
            lost_blocks: ints(),
            retained: ints(),
            reclaimed: ints(),
            pause: hist(),
            scan: hist(),
            checks: Family::default(),
            growth: Floats::default(),
            forecast: Floats::default(),
            limit: ints(),
            sites: ints(),
            top,
            changing: Default::default(),
        };
        let r = &mut registry;
        r.register_with_unit(
            "rss",
            "Resident set size of the process at the last check",
            Unit::Bytes,
            m.rss.clone(),
        );
        r.register_with_unit(
            "vm",
            "Virtual size of the process at the last check (what RLIMIT_AS limits)",
            Unit::Bytes,
            m.vm.clone(),
        );
        r.register_with_unit(
            "live",
            "Bytes in live heap blocks at the last check",
            Unit::Bytes,
            m.live.clone(),
        );
        r.register_with_unit(
            "lost",
            "Bytes of lost heap blocks at the last check, by class (direct: definitely lost, indirect, possible)",
            Unit::Bytes,
            m.lost.clone(),
        );
        r.register(
            "lost_blocks",
            "Lost heap blocks at the last check, by class",
            m.lost_blocks.clone(),
        );
        r.register_with_unit(
            "retained",
            "Free memory the allocator keeps resident (not a leak)",
            Unit::Bytes,
            m.retained.clone(),
        );
        r.register_with_unit(
            "reclaimed",
            "Memory kal reclaimed in the process: parked now, freed so far, restored on touch so far",
            Unit::Bytes,
            m.reclaimed.clone(),
        );
        r.register_with_unit(
            "pause",
            "How long each check stopped the process's threads",
            Unit::Seconds,
            m.pause.clone(),
        );
        r.register_with_unit(
            "scan",
            "How long each check took to copy and scan the snapshot (the process runs on)",
            Unit::Seconds,
            m.scan.clone(),
        );
        r.register("checks", "Checks done", m.checks.clone());
        r.register_with_unit(
            "rss_growth",
            "Growth of the RSS per second (Theil-Sen fit over the recent checks)",
            Unit::Other("bytes_per_second".into()),
            m.growth.clone(),
        );
        r.register_with_unit(
            "forecast",
            "Seconds until the process reaches its first memory limit at its current growth (+Inf: not growing toward one)",
            Unit::Seconds,
            m.forecast.clone(),
        );
        r.register_with_unit(
            "limit",
            "The memory limit the forecast is for (cgroup_v2, cgroup_v1, rlimit_as, memory_available)",
            Unit::Bytes,
            m.limit.clone(),
        );
        r.register_with_unit(
            "site_lost",
            "Lost bytes (definitely and indirectly) by allocation site: the top sites, the rest as site=\"other\"",
            Unit::Bytes,
            m.sites.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Records the check of process `pid` that produced `r`, and its forecast if any.
    pub fn observe(&self, pid: i32, r: &Report, forecast: Option<&Forecast>) {
        let p = labels(pid, &[]);
        let set = |f: &Ints, l: &Labels, v: u64| {
            f.get_or_create(l).set(v.min(i64::MAX as u64) as i64);
        };
        set(&self.rss, &p, r.memory.rss_bytes);
        set(&self.vm, &p, crate::act::limits::vm_bytes(pid));
        set(&self.live, &p, r.memory.live_bytes);
        set(&self.retained, &p, r.memory.retained_bytes);
        let s = &r.summary;
        for (class, t) in [
            ("direct", s.direct),
            ("indirect", s.indirect),
            ("possible", s.possible),
        ] {
            let l = labels(pid, &[("class", class)]);
            set(&self.lost, &l, t.bytes);
            set(&self.lost_blocks, &l, t.blocks);
        }
        let rc = &r.reclaimed;
        for (how, v) in [
            ("parked", rc.parked_now_bytes),
            ("freed", rc.freed_bytes),
            ("restored", rc.restored_bytes),
        ] {
            set(&self.reclaimed, &labels(pid, &[("how", how)]), v);
        }
        if let Some(ms) = r.pause_ms {
            self.pause.get_or_create(&p).observe(ms / 1e3);
        }
        if let Some(ms) = r.scan_ms {
            self.scan.get_or_create(&p).observe(ms / 1e3);
        }
        self.checks.get_or_create(&p).inc();
        self.observe_sites(pid, r);
        if let Some(f) = forecast {
            self.observe_forecast(pid, f);
        }
    }

    /// `kal_site_lost_bytes` for process `pid`: its top sites and "other".
    fn observe_sites(&self, pid: i32, r: &Report) {
        let mut by: std::collections::BTreeMap<String, u64> = Default::default();
        for rec in &r.leaks {
            if matches!(
                rec.kind,
                crate::reach::Kind::Direct | crate::reach::Kind::Indirect
            ) {
                *by.entry(crate::act::forecast::site_name(rec)).or_default() += rec.bytes;
            }
        }
        let mut v: Vec<(String, u64)> = by.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let other: u64 = v.iter().skip(self.top).map(|s| s.1).sum();
        v.truncate(self.top);
        let mut now: Vec<Labels> = Vec::new();
        for (site, bytes) in v
            .iter()
            .map(|(s, b)| (s.as_str(), *b))
            .chain([("other", other)])
        {
            let l = labels(pid, &[("site", site)]);
            self.sites
                .get_or_create(&l)
                .set(bytes.min(i64::MAX as u64) as i64);
            now.push(l);
        }
        // Sites come and go: drop the series of those gone since the previous check.
        let mut changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let ch = changing.entry(pid).or_default();
        for l in ch.sites.iter().filter(|l| !now.contains(l)) {
            self.sites.remove(l);
        }
        ch.sites = now;
    }

    fn observe_forecast(&self, pid: i32, f: &Forecast) {
        if f.points < MIN_POINTS {
            return;
        }
        let p = labels(pid, &[]);
        if let Some(g) = f.rss_bytes_per_second {
            self.growth.get_or_create(&p).set(g);
        }
        let ll = f.limit.as_ref().map(|l| labels(pid, &[("limit", l.kind)]));
        let mut changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let ch = changing.entry(pid).or_default();
        if let Some(old) = ch.limit.take().filter(|old| Some(old) != ll.as_ref()) {
            self.forecast.remove(&old);
            self.limit.remove(&old);
        }
        if let (Some(l), Some(ll)) = (&f.limit, ll) {
            self.forecast
                .get_or_create(&ll)
                .set(f.seconds_to_limit.unwrap_or(f64::INFINITY));
            self.limit
                .get_or_create(&ll)
                .set(l.limit_bytes.min(i64::MAX as u64) as i64);
            ch.limit = Some(ll);
        }
    }

    /// Drops every series of process `pid` (it ended).
    pub fn forget(&self, pid: i32) {
        let p = labels(pid, &[]);
        for f in [&self.rss, &self.vm, &self.live, &self.retained] {
            f.remove(&p);
        }
        self.growth.remove(&p);
        for class in ["direct", "indirect", "possible"] {
            let l = labels(pid, &[("class", class)]);
            self.lost.remove(&l);
            self.lost_blocks.remove(&l);
        }
        for how in ["parked", "freed", "restored"] {
            self.reclaimed.remove(&labels(pid, &[("how", how)]));
        }
        let ch = self
            .changing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid)
            .unwrap_or_default();
        for l in &ch.sites {
            self.sites.remove(l);
        }
        if let Some(l) = &ch.limit {
            self.forecast.remove(l);
            self.limit.remove(l);
        }
    }

    /// The metrics in the text exposition format (OpenMetrics).
    pub fn text(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

/// The content type of [`Metrics::text`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `metrics` at `http://ADDR/metrics` on a thread of its own; returns the address
/// bound (port 0 picks a free one). Fails at once when ADDR cannot be bound.
pub fn serve(addr: &str, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("cannot serve metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("kal-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    // One bad client must not stop the server.
                    Ok(c) => drop(answer(c, &metrics)),
                    // Out of file descriptors, say: wait rather than spin.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })?;
    Ok(bound)
}

/// Answers one HTTP/1.x request: `GET /metrics` (200), anything else 404 or 405.
fn answer(mut c: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&req);
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", CONTENT_TYPE, metrics.text()),
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "kal: metrics at /metrics\n".to_string(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: try /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
    };
    write!(
        c,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        c.write_all(body.as_bytes())?;
    }
    c.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_help_type_and_units() {
        let m = Metrics::new(2);
        m.rss.get_or_create(&labels(7, &[])).set(4096);
        m.lost
            .get_or_create(&labels(7, &[("class", "direct")]))
            .set(100);
        m.pause.get_or_create(&labels(7, &[])).observe(0.002);
        let t = m.text();
        assert!(t.contains("kal_rss_bytes{pid=\"7\"} 4096\n"), "{t}");
        assert!(
            t.contains("kal_lost_bytes{pid=\"7\",class=\"direct\"} 100\n"),
            "{t}"
        );
        assert!(t.contains("kal_pause_seconds_count{pid=\"7\"} 1\n"), "{t}");
        for name in ["kal_rss_bytes", "kal_lost_bytes", "kal_pause_seconds"] {
            assert!(t.contains(&format!("# HELP {name} ")), "{t}");
            assert!(t.contains(&format!("# TYPE {name} ")), "{t}");
        }
        assert!(t.ends_with("# EOF\n"));
    }
}
