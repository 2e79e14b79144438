//! Prometheus metrics. Every per-model family carries the same three labels, `tenant`, `model`
//! and `version` (a request refused before its version was known has `version=""`); the README
//! lists each family beside its TorchServe, Triton and SageMaker counterpart.
//!
//! Counters and histograms are updated as things happen; gauges of state (queue depth,
//! requests in flight, memory, the process) are read when `/metrics` is scraped
//! ([`Metrics::render`] with a [`Snapshot`]).
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::Mutex;

/// The labels of every per-model family.
pub const MODEL_LABELS: [&str; 3] = ["tenant", "model", "version"];

/// Status codes kept as they are in `code` labels; any other (a handler may answer any status)
/// is counted under its class (`2xx`, `4xx`, ...), so clients cannot grow the label set.
const CODES: [&str; 18] = [
    "200", "201", "202", "204", "400", "401", "403", "404", "408", "409", "413", "415", "422",
    "429", "500", "503", "504", "507",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `code` label of a status.
pub fn code_label(status: u16) -> &'static str {
    let s = status.to_string();
    CODES
        .iter()
        .find(|c| **c == s)
        .copied()
        .unwrap_or(match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        })
}

/// Reads one figure of [`ProcessStats`].
type ProcessField = fn(&ProcessStats) -> f64;

pub struct Metrics {
    registry: Registry,
    /// Requests by model and HTTP status.
    pub requests: IntCounterVec,
    /// End-to-end request latency by model.
    pub request_seconds: HistogramVec,
    /// Time requests waited in a model's queue for a forward thread.
    pub queue_seconds: HistogramVec,
    /// Forward-pass latency by model.
    pub inference_seconds: HistogramVec,
    /// Model loads by model and outcome.
    pub loads: IntCounterVec,
    pub load_seconds: HistogramVec,
    /// Evictions by model and cause (`budget`, `out-of-memory`, `unload`: see
    /// [`crate::residency::EvictionCause`]).
    pub evictions: IntCounterVec,
    /// Moves of a model's weights between tiers, by direction (`to-host`: evicted from the
    /// device into host memory; `from-host`: swapped back in).
    pub swaps: IntCounterVec,
    /// Bytes those moves copied, by direction.
    pub swap_bytes: IntCounterVec,
    /// Bytes the host-memory tier holds.
    pub host_tier_bytes: IntGauge,
    /// Bytes held on the device by each resident model.
    pub resident_bytes: IntGaugeVec,
    pub resident_models: IntGauge,
    /// Requests turned away because a model's queue was full.
    pub rejected: IntCounterVec,
    /// Cached-stage lookups by model and result (hit, miss).
    pub stage_cache: IntCounterVec,
    /// Requests by the number of requests in the forward that served them (1: alone).
    pub batch_size: HistogramVec,
    // State read at scrape time.
    queue_depth: IntGaugeVec,
    in_flight: IntGaugeVec,
    budget_bytes: IntGauge,
    used_bytes: IntGauge,
    gpu_used: IntGaugeVec,
    gpu_total: IntGaugeVec,
    gpu_allocated: IntGaugeVec,
    process: Vec<(Gauge, ProcessField)>,
    /// One scrape at a time: a scrape resets and refills the state gauges.
    render_lock: Mutex<()>,
}

/// A resident model's state at scrape time.
pub struct ModelState {
    pub labels: [String; 3],
    /// Jobs waiting for a forward thread.
    pub queue_depth: usize,
    /// Requests admitted and not finished (preprocess to postprocess).
    pub in_flight: usize,
}

/// The server's state at scrape time.
pub struct Snapshot {
    pub models: Vec<ModelState>,
    pub budget_bytes: u64,
    pub used_bytes: u64,
    /// Per CUDA device: (device name, used by every process, total, held by this process's
    /// caching allocator).
    pub gpus: Vec<(String, u64, u64, u64)>,
}

fn counter(name: &str, help: &str, extra: &[&str]) -> IntCounterVec {
    let labels: Vec<&str> = MODEL_LABELS.iter().chain(extra).copied().collect();
    IntCounterVec::new(Opts::new(name, help), &labels).unwrap()
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets),
        &MODEL_LABELS,
    )
    .unwrap()
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).unwrap()
}

fn fgauge(name: &str, help: &str) -> Gauge {
    Gauge::new(name, help).unwrap()
}

fn gauges(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).unwrap()
}

impl Metrics {
    pub fn new() -> Metrics {
        let seconds = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            120.0,
        ];
        let m = Metrics {
            registry: Registry::new(),
            requests: counter(
                "tessera_requests_total",
                "Inference requests by model and status code",
                &["code"],
            ),
            request_seconds: histogram(
                "tessera_request_duration_seconds",
                "End-to-end request latency",
                seconds.clone(),
            ),
            queue_seconds: histogram(
                "tessera_queue_duration_seconds",
                "Time requests waited in the model's queue for a forward thread",
                seconds.clone(),
            ),
            inference_seconds: histogram(
                "tessera_inference_duration_seconds",
                "Model forward latency",
                seconds.clone(),
            ),
            loads: counter(
                "tessera_model_loads_total",
                "Model loads by model and outcome",
                &["outcome"],
            ),
            load_seconds: histogram(
                "tessera_model_load_duration_seconds",
                "Model load time (store to device, warm-up excluded)",
                seconds,
            ),
            evictions: counter(
                "tessera_model_evictions_total",
                "Models removed from residency, by cause",
                &["cause"],
            ),
            swaps: counter(
                "tessera_model_swaps_total",
                "Moves of a model's weights between the device and host memory, by direction",
                &["direction"],
            ),
            swap_bytes: IntCounterVec::new(
                Opts::new(
                    "tessera_swap_bytes_total",
                    "Bytes copied between the device and host memory, by direction",
                ),
                &["direction"],
            )
            .unwrap(),
            host_tier_bytes: gauge(
                "tessera_host_tier_bytes",
                "Bytes of model weights held in the host-memory tier",
            ),
            resident_bytes: gauges(
                "tessera_model_resident_bytes",
                "Bytes a resident model holds on its device",
                &MODEL_LABELS,
            ),
            resident_models: gauge("tessera_resident_models", "Models currently resident"),
            rejected: counter(
                "tessera_requests_rejected_total",
                "Requests rejected because the model's queue was full",
                &[],
            ),
            stage_cache: counter(
                "tessera_stage_cache_total",
                "Cached-stage lookups (e.g. image embeddings) by result",
                &["result"],
            ),
            batch_size: histogram(
                "tessera_batch_size",
                "Requests by the size of the batch whose forward served them",
                vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ],
            ),
            queue_depth: gauges(
                "tessera_queue_depth",
                "Requests of a resident model waiting for a forward thread",
                &MODEL_LABELS,
            ),
            in_flight: gauges(
                "tessera_requests_in_flight",
                "Requests of a resident model admitted and not finished",
                &MODEL_LABELS,
            ),
            budget_bytes: gauge(
                "tessera_residency_budget_bytes",
                "Residency budget: device bytes resident models may hold",
            ),
            used_bytes: gauge(
                "tessera_residency_used_bytes",
                "Device bytes accounted to resident models",
            ),
            gpu_used: gauges(
                "tessera_gpu_memory_used_bytes",
                "GPU memory in use on the device, by every process",
                &["device"],
            ),
            gpu_total: gauges(
                "tessera_gpu_memory_total_bytes",
                "GPU memory of the device",
                &["device"],
            ),
            gpu_allocated: gauges(
                "tessera_gpu_memory_reserved_bytes",
                "GPU memory held by this server's CUDA caching allocator",
                &["device"],
            ),
            process: vec![
                (
                    fgauge(
                        "process_resident_memory_bytes",
                        "Resident memory size in bytes",
                    ),
                    |p| p.rss_bytes as f64,
                ),
                (
                    fgauge(
                        "process_virtual_memory_bytes",
                        "Virtual memory size in bytes",
                    ),
                    |p| p.vsize_bytes as f64,
                ),
                (
                    fgauge(
                        "process_cpu_seconds_total",
                        "User and system CPU time spent in seconds",
                    ),
                    |p| p.cpu_seconds,
                ),
                (fgauge("process_open_fds", "Open file descriptors"), |p| {
                    p.open_fds as f64
                }),
                (
                    fgauge("process_max_fds", "Limit on open file descriptors"),
                    |p| p.max_fds as f64,
                ),
                (fgauge("process_threads", "Threads of the process"), |p| {
                    p.threads as f64
                }),
                (
                    fgauge(
                        "process_start_time_seconds",
                        "Start time of the process since the Unix epoch, in seconds",
                    ),
                    |p| p.start_time_seconds as f64,
                ),
            ],
            render_lock: Mutex::new(()),
        };
        let mut all: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.request_seconds.clone()),
            Box::new(m.queue_seconds.clone()),
            Box::new(m.inference_seconds.clone()),
            Box::new(m.loads.clone()),
            Box::new(m.load_seconds.clone()),
            Box::new(m.evictions.clone()),
            Box::new(m.swaps.clone()),
            Box::new(m.swap_bytes.clone()),
            Box::new(m.host_tier_bytes.clone()),
            Box::new(m.resident_bytes.clone()),
            Box::new(m.resident_models.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.stage_cache.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.budget_bytes.clone()),
            Box::new(m.used_bytes.clone()),
            Box::new(m.gpu_used.clone()),
            Box::new(m.gpu_total.clone()),
            Box::new(m.gpu_allocated.clone()),
        ];
        all.extend(
            m.process
                .iter()
                .map(|(g, _)| Box::new(g.clone()) as Box<dyn prometheus::core::Collector>),
        );
        for c in all {
            m.registry.register(c).unwrap();
        }
        m
    }

    /// Forgets the per-model series of a model version that left residency.
    pub fn forget_resident(&self, labels: [&str; 3]) {
        let _ = self.resident_bytes.remove_label_values(&labels);
    }

    /// Forgets every series of a model version that is gone (unloaded, unregistered, deleted),
    /// so that churn through names and versions does not grow the metric set without bound.
    pub fn forget_model(&self, labels: [&str; 3]) {
        fn with<'a>(labels: [&'a str; 3], extra: &'a str) -> [&'a str; 4] {
            [labels[0], labels[1], labels[2], extra]
        }
        for code in CODES.iter().chain(&CLASSES) {
            let _ = self.requests.remove_label_values(&with(labels, code));
        }
        for outcome in ["ok", "error"] {
            let _ = self.loads.remove_label_values(&with(labels, outcome));
        }
        for cause in crate::residency::EvictionCause::ALL {
            let _ = self
                .evictions
                .remove_label_values(&with(labels, cause.as_str()));
        }
        for direction in ["to-host", "from-host"] {
            let _ = self.swaps.remove_label_values(&with(labels, direction));
        }
        for result in ["hit", "miss"] {
            let _ = self.stage_cache.remove_label_values(&with(labels, result));
        }
        for h in [
            &self.request_seconds,
            &self.queue_seconds,
            &self.inference_seconds,
            &self.load_seconds,
            &self.batch_size,
        ] {
            let _ = h.remove_label_values(&labels);
        }
        let _ = self.rejected.remove_label_values(&labels);
        let _ = self.resident_bytes.remove_label_values(&labels);
    }

    /// The text exposition format, state gauges read from `snapshot` and `/proc`.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let _one = self.render_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.queue_depth.reset();
        self.in_flight.reset();
        for m in &snapshot.models {
            let labels = [&*m.labels[0], &*m.labels[1], &*m.labels[2]];
            self.queue_depth
                .with_label_values(&labels)
                .set(m.queue_depth as i64);
            self.in_flight
                .with_label_values(&labels)
                .set(m.in_flight as i64);
        }
        self.budget_bytes.set(snapshot.budget_bytes as i64);
        self.used_bytes.set(snapshot.used_bytes as i64);
        for (device, used, total, reserved) in &snapshot.gpus {
            self.gpu_used.with_label_values(&[device]).set(*used as i64);
            self.gpu_total
                .with_label_values(&[device])
                .set(*total as i64);
            self.gpu_allocated
                .with_label_values(&[device])
                .set(*reserved as i64);
        }
        if let Some(stats) = ProcessStats::read() {
            for (g, read) in &self.process {
                g.set(read(&stats));
            }
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .unwrap_or_default();
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's own figures, from `/proc/self` (Linux).
#[derive(Debug, Default)]
pub struct ProcessStats {
    pub rss_bytes: i64,
    pub vsize_bytes: i64,
    pub cpu_seconds: f64,
    pub open_fds: i64,
    pub max_fds: i64,
    pub threads: i64,
    pub start_time_seconds: i64,
}

impl ProcessStats {
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<i64>().ok());
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK).max(1),
                libc::sysconf(libc::_SC_PAGESIZE).max(1),
            )
        };
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<i64>().ok())?;
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3)?.parse::<i64>().ok())
            })
            .unwrap_or(0);
        Some(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks as f64,
            threads: field(20)?,
            start_time_seconds: boot + field(22)? / ticks,
            vsize_bytes: field(23)?,
            rss_bytes: field(24)? * page,
            open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64),
            max_fds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_are_read() {
        let p = ProcessStats::read().unwrap();
        assert!(p.rss_bytes > 0 && p.vsize_bytes >= p.rss_bytes);
        assert!(p.threads >= 1 && p.open_fds >= 3 && p.max_fds >= p.open_fds);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(p.start_time_seconds <= now && p.start_time_seconds > now - 3600);
    }

    #[test]
    fn state_gauges_follow_the_snapshot() {
        let m = Metrics::new();
        let model = |v: &str, depth| ModelState {
            labels: ["alice".into(), "sam".into(), v.into()],
            queue_depth: depth,
            in_flight: depth + 1,
        };
        let text = m.render(&Snapshot {
            models: vec![model("1", 3), model("2", 0)],
            budget_bytes: 100,
            used_bytes: 40,
            gpus: vec![],
        });
        assert!(text.contains(r#"tessera_queue_depth{model="sam",tenant="alice",version="1"} 3"#));
        assert!(text
            .contains(r#"tessera_requests_in_flight{model="sam",tenant="alice",version="2"} 1"#));
        assert!(text.contains("tessera_residency_used_bytes 40"));
        assert!(text.contains("process_resident_memory_bytes "));
        // A model gone from the snapshot leaves no stale series.
        let text = m.render(&Snapshot {
            models: vec![model("2", 0)],
            budget_bytes: 100,
            used_bytes: 0,
            gpus: vec![],
        });
        assert!(!text.contains(r#"version="1""#), "{text}");
    }

    #[test]
    fn codes_are_bounded_and_gone_models_forgotten() {
        assert_eq!(code_label(200), "200");
        assert_eq!(code_label(299), "2xx");
        assert_eq!(code_label(999), "5xx");
        let m = Metrics::new();
        for v in ["1", "2"] {
            m.requests
                .with_label_values(&["t", "m", v, code_label(418)])
                .inc();
            m.loads.with_label_values(&["t", "m", v, "ok"]).inc();
            m.request_seconds
                .with_label_values(&["t", "m", v])
                .observe(0.1);
        }
        m.forget_model(["t", "m", "1"]);
        let text = m.render(&Snapshot {
            models: vec![],
            budget_bytes: 0,
            used_bytes: 0,
            gpus: vec![],
        });
        assert!(!text.contains(r#"version="1""#), "{text}");
        assert!(
            text.contains(r#"code="4xx",model="m",tenant="t",version="2""#),
            "{text}"
        );
    }
}
