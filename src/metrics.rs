//! Operational metrics, exposed in the Prometheus text format at `/metrics`.
//! Labels carry domain, product and source names, outcomes and error kinds
//! only: never users, SQL or values.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::Mutex;

/// Upper bounds (seconds) of the latency histograms.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        self.count += 1;
        self.sum += seconds;
        for (bucket, bound) in self.buckets.iter_mut().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    }

    /// The series of the histogram `name`, with `labels` (`key="value"`,
    /// comma-separated, or empty) on each.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (count, bound) in self.buckets.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// Per product: queries by outcome, result rows and bytes.
#[derive(Debug, Default, Clone)]
struct ProductCounters {
    queries: BTreeMap<&'static str, u64>,
    rows: u64,
    bytes: u64,
}

/// Per source: request latency (time to the first answer) and failures.
#[derive(Debug, Default, Clone)]
struct SourceCounters {
    latency: Histogram,
    errors: u64,
}

/// A finished query, as the metrics count it.
#[derive(Debug)]
pub struct FinishedQuery<'a> {
    /// `ok`, `error` or `cancelled`.
    pub outcome: &'static str,
    /// The kind of error, for `error`.
    pub error_kind: Option<&'static str>,
    /// The products read, `domain.product`.
    pub products: &'a [String],
    pub rows: u64,
    /// Bytes of Arrow IPC sent to the client.
    pub bytes: u64,
    pub seconds: f64,
}

/// What the mesh can tell about one product's freshness.
#[derive(Debug, Clone)]
pub struct Freshness {
    pub product: String,
    /// When its data last changed (UNIX seconds), where the source can tell.
    pub last_modified: Option<f64>,
    /// The published freshness SLA.
    pub sla_seconds: Option<f64>,
}

/// Counters of one gateway.
#[derive(Debug, Default)]
pub struct Metrics {
    active_queries: AtomicI64,
    rows_returned: AtomicU64,
    bytes_returned: AtomicU64,
    /// Bytes reserved in the query memory pools now.
    memory_reserved: AtomicI64,
    /// By outcome (`ok`, `error`, `cancelled`).
    queries: Mutex<BTreeMap<&'static str, u64>>,
    /// Failed queries by kind of error.
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// By domain and outcome.
    domain_queries: Mutex<BTreeMap<(String, &'static str), u64>>,
    products: Mutex<BTreeMap<String, ProductCounters>>,
    sources: Mutex<BTreeMap<String, SourceCounters>>,
    latency: Mutex<Histogram>,
    /// Statements planned, plans reused for the same caller, and plans
    /// of a statement's shape bound with its constants.
    plans_made: AtomicU64,
    plans_reused: AtomicU64,
    plans_rebound: AtomicU64,
    /// Physical plans of queries run: made ahead while the client asked
    /// for the rows, or as the query started.
    physical_plans_ahead: AtomicU64,
    physical_plans_at_start: AtomicU64,
    /// Config reloads by outcome (`ok`, `rejected`).
    reloads: Mutex<BTreeMap<&'static str, u64>>,
    /// When the config was last loaded successfully (UNIX seconds).
    config_loaded_at: Mutex<Option<f64>>,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// A label value, escaped as the text format requires.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A counter with one series for each value of `label`.
fn counters(out: &mut String, name: &str, help: &str, label: &str, series: &[(&str, &AtomicU64)]) {
    header(out, name, "counter", help);
    for (value, counter) in series {
        let count = counter.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
    }
}

impl Metrics {
    pub fn query_started(&self) {
        self.active_queries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn query_stopped(&self) {
        self.active_queries.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn active_queries(&self) -> i64 {
        self.active_queries.load(Ordering::Relaxed)
    }

    /// Query memory pools grew (positive) or shrank (negative) by `bytes`.
    pub fn memory_changed(&self, bytes: i64) {
        self.memory_reserved.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn memory_reserved(&self) -> i64 {
        self.memory_reserved.load(Ordering::Relaxed)
    }

    /// A source answered a request after `seconds` (to its first batch), or
    /// failed.
    pub fn source_request(&self, source: &str, seconds: f64, failed: bool) {
        let mut sources = self.sources.lock();
        let counters = sources.entry(source.to_string()).or_default();
        counters.latency.observe(seconds);
        if failed {
            counters.errors += 1;
        }
    }

    /// A statement was planned (`reused` false) or its recent plan reused.
    pub fn statement_planned(&self, reused: bool) {
        let counter = if reused {
            &self.plans_reused
        } else {
            &self.plans_made
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A statement was planned by binding its constants into the plan of
    /// its shape (see `query::shapes`).
    pub fn statement_rebound(&self) {
        self.plans_rebound.fetch_add(1, Ordering::Relaxed);
    }

    /// A query started with a physical plan made ahead (`ahead`), or made
    /// its own (see `query::ahead`).
    pub fn physical_plan_made(&self, ahead: bool) {
        let counter = if ahead {
            &self.physical_plans_ahead
        } else {
            &self.physical_plans_at_start
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn config_reloaded(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "rejected" };
        *self.reloads.lock().entry(outcome).or_default() += 1;
        if ok {
            self.config_loaded();
        }
    }

    /// The config in use was loaded now.
    pub fn config_loaded(&self) {
        *self.config_loaded_at.lock() = Some(unix_now());
    }

    /// Records a finished query (successful, failed or cancelled).
    pub fn query_finished(&self, query: FinishedQuery<'_>) {
        self.rows_returned.fetch_add(query.rows, Ordering::Relaxed);
        self.bytes_returned
            .fetch_add(query.bytes, Ordering::Relaxed);
        *self.queries.lock().entry(query.outcome).or_default() += 1;
        if let Some(kind) = query.error_kind {
            *self.errors.lock().entry(kind).or_default() += 1;
        }
        let domains: BTreeSet<&str> = query
            .products
            .iter()
            .filter_map(|p| p.split_once('.').map(|(domain, _)| domain))
            .collect();
        {
            let mut by_domain = self.domain_queries.lock();
            for domain in domains {
                *by_domain
                    .entry((domain.to_string(), query.outcome))
                    .or_default() += 1;
            }
        }
        {
            let mut by_product = self.products.lock();
            for product in query.products {
                let counters = by_product.entry(product.clone()).or_default();
                *counters.queries.entry(query.outcome).or_default() += 1;
                counters.rows += query.rows;
                counters.bytes += query.bytes;
            }
        }
        self.latency.lock().observe(query.seconds);
    }

    /// The Prometheus text exposition of every metric, with what the mesh
    /// tells now: products published, their freshness, and whether each
    /// source answers.
    pub fn render(
        &self,
        products_published: usize,
        freshness: &[Freshness],
        sources_up: &[(String, bool)],
    ) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "meshgate_queries_total",
            "counter",
            "Queries run, by outcome.",
        );
        for (outcome, count) in self.queries.lock().iter() {
            let _ = writeln!(
                out,
                "meshgate_queries_total{{outcome=\"{outcome}\"}} {count}"
            );
        }
        counters(
            &mut out,
            "meshgate_plans_total",
            "Statements planned, plans reused by the same caller's next request (`reused`), and plans of the same caller's statement with other constants, rebound (`rebound`).",
            "outcome",
            &[
                ("planned", &self.plans_made),
                ("reused", &self.plans_reused),
                ("rebound", &self.plans_rebound),
            ],
        );
        counters(
            &mut out,
            "meshgate_physical_plans_total",
            "Physical plans of the queries run: made ahead, while the client asked where to fetch the rows (`ahead`), or as the query started (`at_start`).",
            "made",
            &[
                ("ahead", &self.physical_plans_ahead),
                ("at_start", &self.physical_plans_at_start),
            ],
        );
        header(
            &mut out,
            "meshgate_query_errors_total",
            "counter",
            "Failed queries, by kind of error.",
        );
        for (kind, count) in self.errors.lock().iter() {
            let _ = writeln!(
                out,
                "meshgate_query_errors_total{{kind=\"{kind}\"}} {count}"
            );
        }
        header(
            &mut out,
            "meshgate_domain_queries_total",
            "counter",
            "Queries that read products of each domain, by outcome.",
        );
        for ((domain, outcome), count) in self.domain_queries.lock().iter() {
            let _ = writeln!(
                out,
                "meshgate_domain_queries_total{{domain=\"{}\",outcome=\"{outcome}\"}} {count}",
                label(domain)
            );
        }
        let products = self.products.lock().clone();
        header(
            &mut out,
            "meshgate_product_queries_total",
            "counter",
            "Queries that read each product, by outcome.",
        );
        for (product, counters) in &products {
            for (outcome, count) in &counters.queries {
                let _ = writeln!(
                    out,
                    "meshgate_product_queries_total{{product=\"{}\",outcome=\"{outcome}\"}} {count}",
                    label(product)
                );
            }
        }
        header(
            &mut out,
            "meshgate_product_rows_returned_total",
            "counter",
            "Result rows of the queries that read each product.",
        );
        for (product, counters) in &products {
            let _ = writeln!(
                out,
                "meshgate_product_rows_returned_total{{product=\"{}\"}} {}",
                label(product),
                counters.rows
            );
        }
        header(
            &mut out,
            "meshgate_product_bytes_returned_total",
            "counter",
            "Result bytes (Arrow IPC) of the queries that read each product.",
        );
        for (product, counters) in &products {
            let _ = writeln!(
                out,
                "meshgate_product_bytes_returned_total{{product=\"{}\"}} {}",
                label(product),
                counters.bytes
            );
        }
        for (name, help, value) in [
            (
                "meshgate_rows_returned_total",
                "Rows sent to clients.",
                self.rows_returned.load(Ordering::Relaxed),
            ),
            (
                "meshgate_bytes_returned_total",
                "Result bytes (Arrow IPC) sent to clients.",
                self.bytes_returned.load(Ordering::Relaxed),
            ),
        ] {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {value}");
        }
        for (name, help, value) in [
            (
                "meshgate_active_queries",
                "Queries running now.",
                self.active_queries(),
            ),
            (
                "meshgate_memory_reserved_bytes",
                "Memory reserved by running queries (DataFusion memory pools).",
                self.memory_reserved(),
            ),
            (
                "meshgate_products_published",
                "Products served.",
                i64::try_from(products_published).unwrap_or(i64::MAX),
            ),
        ] {
            header(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
        if let Some(rss) = resident_memory_bytes() {
            header(
                &mut out,
                "meshgate_process_resident_memory_bytes",
                "gauge",
                "Resident memory of the gateway process.",
            );
            let _ = writeln!(out, "meshgate_process_resident_memory_bytes {rss}");
        }
        header(
            &mut out,
            "meshgate_query_duration_seconds",
            "histogram",
            "Time from execution start to the end of the result stream.",
        );
        self.latency
            .lock()
            .render(&mut out, "meshgate_query_duration_seconds", "");
        let sources = self.sources.lock().clone();
        header(
            &mut out,
            "meshgate_source_request_duration_seconds",
            "histogram",
            "Time a SQL or Flight SQL source took to answer a pushed-down request (to its first batch).",
        );
        for (source, counters) in &sources {
            counters.latency.render(
                &mut out,
                "meshgate_source_request_duration_seconds",
                &format!("source=\"{}\"", label(source)),
            );
        }
        header(
            &mut out,
            "meshgate_source_errors_total",
            "counter",
            "Requests a source failed.",
        );
        for (source, counters) in &sources {
            let _ = writeln!(
                out,
                "meshgate_source_errors_total{{source=\"{}\"}} {}",
                label(source),
                counters.errors
            );
        }
        header(
            &mut out,
            "meshgate_row_group_cache_bytes",
            "gauge",
            "Bytes of decoded Parquet column chunks kept for lookups (see limits.row_group_cache).",
        );
        let _ = writeln!(
            out,
            "meshgate_row_group_cache_bytes {}",
            crate::catalog::row_group_cache_bytes()
        );
        header(
            &mut out,
            "meshgate_page_cache_bytes",
            "gauge",
            "Bytes of decompressed Parquet column chunks kept for scans (see limits.page_cache).",
        );
        let _ = writeln!(
            out,
            "meshgate_page_cache_bytes {}",
            crate::catalog::page_cache_bytes()
        );
        header(
            &mut out,
            "meshgate_page_cache_decompressions_total",
            "counter",
            "Parquet column chunks decompressed for the page cache, kept or turned away.",
        );
        let _ = writeln!(
            out,
            "meshgate_page_cache_decompressions_total {}",
            crate::catalog::page_cache_decompressions()
        );
        header(
            &mut out,
            "meshgate_source_up",
            "gauge",
            "Whether a SQL or Flight SQL source, or a cloud object store, answers (1) or not (0), probed at each scrape.",
        );
        for (source, up) in sources_up {
            let _ = writeln!(
                out,
                "meshgate_source_up{{source=\"{}\"}} {}",
                label(source),
                u8::from(*up)
            );
        }
        header(
            &mut out,
            "meshgate_product_last_modified_timestamp_seconds",
            "gauge",
            "When a product's data last changed (file modification time), UNIX seconds.",
        );
        for f in freshness {
            if let Some(at) = f.last_modified {
                let _ = writeln!(
                    out,
                    "meshgate_product_last_modified_timestamp_seconds{{product=\"{}\"}} {at}",
                    label(&f.product)
                );
            }
        }
        header(
            &mut out,
            "meshgate_product_freshness_seconds",
            "gauge",
            "Age of a product's data: seconds since it last changed.",
        );
        let now = unix_now();
        for f in freshness {
            if let Some(at) = f.last_modified {
                let _ = writeln!(
                    out,
                    "meshgate_product_freshness_seconds{{product=\"{}\"}} {}",
                    label(&f.product),
                    (now - at).max(0.0)
                );
            }
        }
        header(
            &mut out,
            "meshgate_product_freshness_sla_seconds",
            "gauge",
            "The freshness a product's owners publish (its `freshness`).",
        );
        for f in freshness {
            if let Some(sla) = f.sla_seconds {
                let _ = writeln!(
                    out,
                    "meshgate_product_freshness_sla_seconds{{product=\"{}\"}} {sla}",
                    label(&f.product)
                );
            }
        }
        header(
            &mut out,
            "meshgate_config_reloads_total",
            "counter",
            "Config reloads, by outcome (`ok`, `rejected`: the running config stayed).",
        );
        for (outcome, count) in self.reloads.lock().iter() {
            let _ = writeln!(
                out,
                "meshgate_config_reloads_total{{outcome=\"{outcome}\"}} {count}"
            );
        }
        if let Some(at) = *self.config_loaded_at.lock() {
            header(
                &mut out,
                "meshgate_config_loaded_timestamp_seconds",
                "gauge",
                "When the config in use was loaded, UNIX seconds.",
            );
            let _ = writeln!(out, "meshgate_config_loaded_timestamp_seconds {at}");
        }
        out
    }
}

/// The process's resident set size, where the platform tells it.
fn resident_memory_bytes() -> Option<u64> {
    // `status` states kB, so the page size (4 KiB, 16 KiB, 64 KiB) never enters.
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::{FinishedQuery, Freshness, Metrics};

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let metrics = Metrics::default();
        metrics.query_started();
        metrics.query_finished(FinishedQuery {
            outcome: "ok",
            error_kind: None,
            products: &["crm.region".into(), "crm.nation".into()],
            rows: 5,
            bytes: 300,
            seconds: 0.003,
        });
        metrics.query_finished(FinishedQuery {
            outcome: "error",
            error_kind: Some("timeout"),
            products: &[],
            rows: 0,
            bytes: 0,
            seconds: 2.0,
        });
        metrics.source_request("ledger.pg", 0.02, false);
        metrics.source_request("ledger.pg", 0.2, true);
        metrics.memory_changed(1024);
        metrics.config_reloaded(false);
        let text = metrics.render(
            9,
            &[Freshness {
                product: "crm.region".into(),
                last_modified: Some(1.0),
                sla_seconds: Some(86400.0),
            }],
            &[("ledger.pg".into(), false)],
        );
        for expected in [
            "meshgate_queries_total{outcome=\"ok\"} 1",
            "meshgate_queries_total{outcome=\"error\"} 1",
            "meshgate_query_errors_total{kind=\"timeout\"} 1",
            // One query of two crm products counts once for the domain.
            "meshgate_domain_queries_total{domain=\"crm\",outcome=\"ok\"} 1",
            "meshgate_product_queries_total{product=\"crm.region\",outcome=\"ok\"} 1",
            "meshgate_product_rows_returned_total{product=\"crm.nation\"} 5",
            "meshgate_product_bytes_returned_total{product=\"crm.region\"} 300",
            "meshgate_rows_returned_total 5",
            "meshgate_bytes_returned_total 300",
            "meshgate_active_queries 1",
            "meshgate_memory_reserved_bytes 1024",
            "meshgate_products_published 9",
            "meshgate_query_duration_seconds_bucket{le=\"0.0025\"} 0",
            "meshgate_query_duration_seconds_bucket{le=\"0.005\"} 1",
            "meshgate_query_duration_seconds_bucket{le=\"5\"} 2",
            "meshgate_query_duration_seconds_count 2",
            "meshgate_source_request_duration_seconds_bucket{source=\"ledger.pg\",le=\"0.025\"} 1",
            "meshgate_source_request_duration_seconds_count{source=\"ledger.pg\"} 2",
            "meshgate_source_errors_total{source=\"ledger.pg\"} 1",
            "meshgate_source_up{source=\"ledger.pg\"} 0",
            "meshgate_product_last_modified_timestamp_seconds{product=\"crm.region\"} 1",
            "meshgate_product_freshness_sla_seconds{product=\"crm.region\"} 86400",
            "meshgate_config_reloads_total{outcome=\"rejected\"} 1",
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }
        assert!(!text.contains("meshgate_config_loaded_timestamp_seconds"));
    }
}
