//! Dedicated forward threads for one model.
//!
//! libtorch keeps per-thread state on the GPU path (cuDNN and cuBLAS handles, cuDNN's
//! execution-plan cache), so a model's forwards always run on the same `maxWorkers` threads,
//! warm, instead of on whichever blocking-pool thread happens to be free. Requests queue on a
//! channel; each thread takes the next job, runs it and answers on a oneshot. Dropping the
//! [`ForwardWorkers`] closes the channel: the threads finish their current job, exit, and the
//! last one frees the model.
use super::{HostTensor, Pipeline, PipelineInput, RuntimeError};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The outputs (and whether the stage cache answered), and the time the job queued.
type Reply = (
    Result<(Vec<HostTensor>, Option<bool>), RuntimeError>,
    Duration,
);

struct Job {
    input: Arc<PipelineInput>,
    queued: Instant,
    reply: oneshot::Sender<Reply>,
}

/// A model's forward threads.
pub struct ForwardWorkers {
    tx: mpsc::Sender<Job>,
}

impl ForwardWorkers {
    /// Starts `threads` workers sharing `model`.
    pub fn spawn(
        model: Arc<Pipeline>,
        threads: usize,
        name: &str,
    ) -> std::io::Result<ForwardWorkers> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let (rx, model) = (rx.clone(), model.clone());
            let thread_name: String = format!("fwd-{name}")
                .chars()
                .take(12)
                .chain(format!("-{i}").chars())
                .collect();
            std::thread::Builder::new()
                .name(thread_name)
                .spawn(move || loop {
                    // Only the waiting thread holds the lock; it is released before the forward.
                    let job = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => break,
                    };
                    let Ok(job) = job else { break };
                    let queue = job.queued.elapsed();
                    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        model.forward(&job.input)
                    }))
                    .unwrap_or_else(|_| Err(RuntimeError::Forward("forward panicked".into())));
                    let _ = job.reply.send((out, queue));
                })?;
        }
        Ok(ForwardWorkers { tx })
    }

    /// Runs one forward on the next free worker; returns its result and the time it queued.
    pub async fn forward(&self, input: Arc<PipelineInput>) -> Result<Reply, RuntimeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                input,
                queued: Instant::now(),
                reply,
            })
            .map_err(|_| RuntimeError::Forward("the model's workers have stopped".into()))?;
        rx.await
            .map_err(|_| RuntimeError::Forward("a forward worker stopped".into()))
    }
}
