//! Operational metrics, exposed in the Prometheus text format at `/metrics`.
//! Labels carry product names and outcomes only: never users, SQL or values.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::Mutex;

/// Upper bounds (seconds) of the query latency histogram.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Counters of one gateway.
#[derive(Debug, Default)]
pub struct Metrics {
    active_queries: AtomicI64,
    rows_returned: AtomicU64,
    /// By outcome (`ok`, `error`, `cancelled`).
    queries: Mutex<BTreeMap<&'static str, u64>>,
    /// By product and outcome.
    product_queries: Mutex<BTreeMap<(String, &'static str), u64>>,
    latency: Mutex<Histogram>,
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

    /// Records a finished query (successful, failed or cancelled).
    pub fn query_finished(
        &self,
        outcome: &'static str,
        products: &[String],
        rows: u64,
        seconds: f64,
    ) {
        self.rows_returned.fetch_add(rows, Ordering::Relaxed);
        *self.queries.lock().entry(outcome).or_default() += 1;
        {
            let mut by_product = self.product_queries.lock();
            for product in products {
                *by_product.entry((product.clone(), outcome)).or_default() += 1;
            }
        }
        let mut latency = self.latency.lock();
        latency.count += 1;
        latency.sum += seconds;
        for (bucket, bound) in latency.buckets.iter_mut().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, products_published: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP meshgate_queries_total Queries run, by outcome."
        );
        let _ = writeln!(out, "# TYPE meshgate_queries_total counter");
        for (outcome, count) in self.queries.lock().iter() {
            let _ = writeln!(
                out,
                "meshgate_queries_total{{outcome=\"{outcome}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshgate_product_queries_total Queries that read each product, by outcome."
        );
        let _ = writeln!(out, "# TYPE meshgate_product_queries_total counter");
        for ((product, outcome), count) in self.product_queries.lock().iter() {
            let _ = writeln!(
                out,
                "meshgate_product_queries_total{{product=\"{product}\",outcome=\"{outcome}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshgate_rows_returned_total Rows sent to clients."
        );
        let _ = writeln!(out, "# TYPE meshgate_rows_returned_total counter");
        let _ = writeln!(
            out,
            "meshgate_rows_returned_total {}",
            self.rows_returned.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP meshgate_active_queries Queries running now.");
        let _ = writeln!(out, "# TYPE meshgate_active_queries gauge");
        let _ = writeln!(out, "meshgate_active_queries {}", self.active_queries());
        let _ = writeln!(out, "# HELP meshgate_products_published Products served.");
        let _ = writeln!(out, "# TYPE meshgate_products_published gauge");
        let _ = writeln!(out, "meshgate_products_published {products_published}");
        let latency = self.latency.lock();
        let _ = writeln!(
            out,
            "# HELP meshgate_query_duration_seconds Time from execution start to the end of the result stream."
        );
        let _ = writeln!(out, "# TYPE meshgate_query_duration_seconds histogram");
        for (count, bound) in latency.buckets.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(
                out,
                "meshgate_query_duration_seconds_bucket{{le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "meshgate_query_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            latency.count
        );
        let _ = writeln!(out, "meshgate_query_duration_seconds_sum {}", latency.sum);
        let _ = writeln!(
            out,
            "meshgate_query_duration_seconds_count {}",
            latency.count
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn renders_counters_gauges_and_a_cumulative_histogram() {
        let metrics = Metrics::default();
        metrics.query_started();
        metrics.query_finished("ok", &["crm.region".into()], 5, 0.003);
        metrics.query_finished("error", &[], 0, 2.0);
        let text = metrics.render(9);
        assert!(
            text.contains("meshgate_queries_total{outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("meshgate_queries_total{outcome=\"error\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "meshgate_product_queries_total{product=\"crm.region\",outcome=\"ok\"} 1"
            )
        );
        assert!(text.contains("meshgate_rows_returned_total 5"));
        assert!(text.contains("meshgate_active_queries 1"));
        assert!(text.contains("meshgate_products_published 9"));
        assert!(text.contains("meshgate_query_duration_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("meshgate_query_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("meshgate_query_duration_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("meshgate_query_duration_seconds_count 2"));
    }
}
