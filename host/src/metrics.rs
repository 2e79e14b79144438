//! Prometheus metrics, named the way TorchServe/Triton operators expect to find them.
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Requests by model and HTTP status.
    pub requests: IntCounterVec,
    /// End-to-end request latency by model.
    pub request_seconds: HistogramVec,
    /// Forward-pass latency by model.
    pub inference_seconds: HistogramVec,
    /// Model loads by model and outcome.
    pub loads: IntCounterVec,
    pub load_seconds: Histogram,
    /// Evictions by model and cause (`budget`, `out-of-memory`, `unload`: see
    /// [`crate::residency::EvictionCause`]).
    pub evictions: IntCounterVec,
    /// Bytes held on the device by each resident model.
    pub resident_bytes: IntGaugeVec,
    pub resident_models: IntGauge,
    /// Requests turned away because a model's queue was full.
    pub rejected: IntCounterVec,
    /// Cached-stage lookups by model and result (hit, miss).
    pub stage_cache: IntCounterVec,
    /// Requests by the number of requests in the forward that served them (1: alone).
    pub batch_size: HistogramVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tessera_requests_total",
                "Inference requests by model and status code",
            ),
            &["model", "code"],
        )
        .unwrap();
        let buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            120.0,
        ];
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tessera_request_duration_seconds",
                "End-to-end request latency",
            )
            .buckets(buckets.clone()),
            &["model"],
        )
        .unwrap();
        let inference_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tessera_inference_duration_seconds",
                "Model forward latency",
            )
            .buckets(buckets.clone()),
            &["model"],
        )
        .unwrap();
        let loads = IntCounterVec::new(
            Opts::new(
                "tessera_model_loads_total",
                "Model loads by model and outcome",
            ),
            &["model", "outcome"],
        )
        .unwrap();
        let load_seconds = Histogram::with_opts(
            HistogramOpts::new("tessera_model_load_duration_seconds", "Model load time")
                .buckets(buckets),
        )
        .unwrap();
        let evictions = IntCounterVec::new(
            Opts::new(
                "tessera_model_evictions_total",
                "Models removed from residency, by cause",
            ),
            &["model", "cause"],
        )
        .unwrap();
        let resident_bytes = IntGaugeVec::new(
            Opts::new(
                "tessera_model_resident_bytes",
                "Bytes a resident model holds on its device",
            ),
            &["model"],
        )
        .unwrap();
        let resident_models =
            IntGauge::new("tessera_resident_models", "Models currently resident").unwrap();
        let rejected = IntCounterVec::new(
            Opts::new(
                "tessera_requests_rejected_total",
                "Requests rejected because the model's queue was full",
            ),
            &["model"],
        )
        .unwrap();
        let stage_cache = IntCounterVec::new(
            Opts::new(
                "tessera_stage_cache_total",
                "Cached-stage lookups (e.g. image embeddings) by result",
            ),
            &["model", "result"],
        )
        .unwrap();
        let batch_size = HistogramVec::new(
            HistogramOpts::new(
                "tessera_batch_size",
                "Requests by the size of the batch whose forward served them",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ]),
            &["model"],
        )
        .unwrap();
        for c in [
            Box::new(stage_cache.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(batch_size.clone()),
            Box::new(requests.clone()),
            Box::new(request_seconds.clone()),
            Box::new(inference_seconds.clone()),
            Box::new(loads.clone()),
            Box::new(load_seconds.clone()),
            Box::new(evictions.clone()),
            Box::new(resident_bytes.clone()),
            Box::new(resident_models.clone()),
            Box::new(rejected.clone()),
        ] {
            registry.register(c).unwrap();
        }
        Metrics {
            registry,
            requests,
            request_seconds,
            inference_seconds,
            loads,
            load_seconds,
            evictions,
            resident_bytes,
            resident_models,
            rejected,
            stage_cache,
            batch_size,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
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
