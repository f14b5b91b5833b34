//! The server's own counters and latency histograms for `/metrics`
//! (Prometheus text), beside the engine's figures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds in seconds (the last is +Inf).
const BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A cumulative histogram of durations.
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, bound) in self.buckets.iter().zip(BOUNDS) {
            if s <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (b, bound) in self.buckets.iter().zip(BOUNDS) {
            out.push_str(&format!(
                "{name}_bucket{{le=\"{bound}\"}} {}\n",
                b.load(Ordering::Relaxed)
            ));
        }
        let count = self.count.load(Ordering::Relaxed);
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {count}\n"));
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        out.push_str(&format!("{name}_sum {sum}\n{name}_count {count}\n"));
    }
}

/// What the HTTP side counts.
pub struct Metrics {
    pub requests: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            time_to_first_token: Histogram::new(),
            inter_token: Histogram::new(),
        }
    }

    pub fn render(&self, out: &mut String) {
        for (name, help, v) in [
            (
                "kvsift_http_requests_total",
                "generation requests accepted",
                &self.requests,
            ),
            (
                "kvsift_prompt_tokens_total",
                "prompt tokens of accepted requests",
                &self.prompt_tokens,
            ),
            (
                "kvsift_completion_tokens_total",
                "tokens generated",
                &self.completion_tokens,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        self.time_to_first_token.render(
            "kvsift_time_to_first_token_seconds",
            "from accepting a request to its first token",
            out,
        );
        self.inter_token.render(
            "kvsift_inter_token_latency_seconds",
            "between consecutive tokens of a request",
            out,
        );
    }
}
