//! Execution of one model's forwards: its [`queue`] and the dedicated threads that take work
//! from it, with the watchdog that quarantines a model whose forward never ends.
//!
//! libtorch keeps per-thread state on the GPU path (cuDNN and cuBLAS handles, cuDNN's
//! execution-plan cache), so a model's forwards always run on the same `maxWorkers` threads,
//! warm, instead of on whichever blocking-pool thread happens to be free. Each thread takes the
//! next job from the model's queue, with the jobs that batch with it up to `batchSize`
//! ([`Batching`]), runs one forward and answers each job. Dropping the [`Engine`] closes the
//! queue: the threads finish the jobs already queued and let go of the model (the last one
//! frees it).
//!
//! A GPU model's forward threads then wait, parked, for the next engine on that device instead
//! of exiting: cuDNN's execution plans are cached per thread (PyTorch keeps them thread-local),
//! so a new thread plans every convolution shape again — 2.3-4.4 ms a shape, 51-149 ms more for
//! a LaMa forward, ~0.5 s for SD2's captures after a swap-in (H100,
//! `bench/results/thread_plan_probe_gpu_h100.md`). A reloaded model (a swap-in), or another
//! model with the same layers, starts on threads that planned them already.
//!
//! A TorchScript forward cannot be interrupted. When one is still running `grace` after its
//! request's deadline (which already answered 504), the watchdog quarantines the model: the
//! `on_quarantine` callback tells residency to answer 503 for it from then on, and the stuck
//! thread is moved to the idle scheduling class (SCHED_IDLE, nice 19), so it runs only on CPU
//! time nothing else wants until the process restarts.
pub mod queue;

use crate::runtime::{self, Forwarded, Pipeline, PipelineInput, RuntimeError, ThreadMode};
use queue::{NotRun, Queue};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// One request's outputs, and whether the stage cache answered.
pub type Outcome = Result<Forwarded, RuntimeError>;

/// A forward's answer to one request.
pub struct Reply {
    pub result: Outcome,
    /// How long it waited for a worker.
    pub queued: Duration,
    /// Requests in the forward (1 unbatched).
    pub batch: usize,
}

/// How a model's workers batch requests (TorchServe's `batchSize` and `maxBatchDelay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most requests in one forward (1: no batching).
    pub max: usize,
    /// Longest a worker waits, from the first request it takes, for a batch to fill (it waits
    /// only while admitted requests are still in their preprocess).
    pub delay: Duration,
}

impl Batching {
    pub const OFF: Batching = Batching {
        max: 1,
        delay: Duration::ZERO,
    };
}

/// A model's queue: inputs in, replies out.
pub type ModelQueue = Queue<Arc<PipelineInput>, Reply>;
/// A request's admission to a model's queue.
pub type Slot = queue::Slot<Arc<PipelineInput>, Reply>;

/// What one worker thread is doing, for the watchdog.
#[derive(Clone, Copy)]
struct Busy {
    deadline: Instant,
    tid: libc::pid_t,
}

/// State shared by a model's workers and the watchdog.
struct Shared {
    name: String,
    busy: Mutex<Vec<Option<Busy>>>,
    grace: Duration,
    quarantined: AtomicBool,
    on_quarantine: Box<dyn Fn() + Send + Sync>,
}

/// A model's queue and forward threads.
pub struct Engine {
    queue: Arc<ModelQueue>,
    workers: usize,
}

/// Every forward thread still running or not yet joined, of every engine (those of unloaded
/// models too, which finish their last forward after their queue closed): joined at shutdown
/// ([`join_all`]); finished ones are reaped whenever an engine starts.
static THREADS: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// A forward thread's assignment: one engine's worker loop, answering whether the thread may
/// serve another engine afterwards (not once its model was quarantined: the thread may have
/// been moved to idle priority).
type Work = Box<dyn FnOnce() -> bool + Send>;

/// What a forward thread keeps between engines, and so which engines it may serve next: the
/// device whose plans and handles it holds, and the grad mode it entered for good.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lane {
    device: String,
    grad: runtime::GradMode,
}

/// A forward thread waiting for its next engine.
struct Parked {
    lane: Lane,
    /// The model it last served (a reload of it prefers this thread: it planned its shapes).
    last: String,
    next: std::sync::mpsc::Sender<Job>,
}

/// A forward thread's next assignment: its name, the model it serves, the work.
type Job = (String, String, Work);

/// Most forward threads parked at once; past it, a thread whose engine ended exits.
const MAX_PARKED: usize = 32;

/// Forward threads waiting for an engine, and whether threads may still park (not after
/// [`join_all`] began).
static PARKED: Mutex<(Vec<Parked>, bool)> = Mutex::new((Vec::new(), true));

fn parked() -> std::sync::MutexGuard<'static, (Vec<Parked>, bool)> {
    PARKED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Names the calling thread (as seen in `/proc`, `top`, and by [`demote`]).
fn set_thread_name(name: &str) {
    if let Ok(name) = std::ffi::CString::new(name) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string (the kernel truncates it to 15
        // bytes) and renames the calling thread only.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
}

/// Whether the calling thread was moved to the idle scheduling class ([`demote`]).
fn demoted() -> bool {
    // SAFETY: reads the calling thread's scheduling policy.
    unsafe { libc::sched_getscheduler(0) == libc::SCHED_IDLE }
}

/// Runs `work` (serving model `model`) on a forward thread called `name`: one parked in `lane`
/// when there is one (one that last served `model` first), else a new thread, which parks in
/// `lane` (if any) once `work` allows.
fn start_worker(lane: Option<Lane>, name: String, model: &str, work: Work) -> std::io::Result<()> {
    let mut job: Job = (name, model.to_string(), work);
    if let Some(lane) = &lane {
        loop {
            let taken = {
                let mut p = parked();
                let at =
                    p.0.iter()
                        .position(|t| &t.lane == lane && t.last == model)
                        .or_else(|| p.0.iter().position(|t| &t.lane == lane));
                at.map(|i| p.0.swap_remove(i))
            };
            let Some(thread) = taken else { break };
            // A thread that exited meanwhile hands the job back.
            match thread.next.send(job) {
                Ok(()) => return Ok(()),
                Err(std::sync::mpsc::SendError(back)) => job = back,
            }
        }
    }
    let handle = std::thread::Builder::new()
        .name(job.0.clone())
        .spawn(move || {
            let (_, mut last, mut work) = job;
            loop {
                let reusable = work();
                let Some(lane) = lane.clone().filter(|_| reusable && !demoted()) else {
                    return;
                };
                let (next, jobs) = std::sync::mpsc::channel();
                {
                    let mut p = parked();
                    if !p.1 || p.0.len() >= MAX_PARKED {
                        return;
                    }
                    p.0.push(Parked { lane, last, next });
                }
                match jobs.recv() {
                    Ok((name, model, w)) => {
                        set_thread_name(&name);
                        (last, work) = (model, w);
                    }
                    Err(_) => return,
                }
            }
        })?;
    if let Ok(mut all) = THREADS.lock() {
        reap(&mut all);
        all.push(handle);
    }
    Ok(())
}

/// Joins the finished forward threads in `threads`, keeping the handles still running.
fn reap(threads: &mut Vec<std::thread::JoinHandle<()>>) {
    let (done, running): (Vec<_>, Vec<_>) = threads.drain(..).partition(|t| t.is_finished());
    for t in done {
        let _ = t.join();
    }
    *threads = running;
}

/// At shutdown, once every engine's queue is closed ([`Engine::close`], or the engine
/// dropped): waits until `deadline` for all forward threads to exit; returns how many still
/// run (forwards that do not end).
pub fn join_all(deadline: Instant) -> usize {
    {
        // Parked threads exit once their channel closes; none parks from now on.
        let mut p = parked();
        p.1 = false;
        p.0.clear();
    }
    loop {
        let running = match THREADS.lock() {
            Ok(mut threads) => {
                reap(&mut threads);
                threads.len()
            }
            Err(_) => return 0,
        };
        if running == 0 || Instant::now() >= deadline {
            return running;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Engine {
    /// Starts `threads` workers sharing `model`, running its TorchScript in `mode`, fed
    /// by a queue admitting `capacity` requests, each forward taking a batch of requests as
    /// `batching` allows. A forward still running `grace` past its deadline quarantines the
    /// model and calls `on_quarantine` once; so does a piece of the work done between requests
    /// (a CUDA graph capture, a warm-up step) that runs longer than `idle_limit` (at most
    /// `grace`).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        model: Arc<Pipeline>,
        threads: usize,
        capacity: usize,
        name: &str,
        mode: ThreadMode,
        batching: Batching,
        grace: Duration,
        idle_limit: Duration,
        on_quarantine: Box<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Engine> {
        static MODELS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = MODELS.fetch_add(1, Ordering::Relaxed);
        let threads = threads.max(1);
        let queue: Arc<ModelQueue> = Queue::new(capacity);
        let engine = Engine {
            queue: queue.clone(),
            workers: threads,
        };
        let shared = Arc::new(Shared {
            name: name.to_string(),
            busy: Mutex::new(vec![None; threads]),
            grace,
            quarantined: AtomicBool::new(false),
            on_quarantine,
        });
        // Threads are lent between engines only where that keeps something (a GPU's per-thread
        // state) and loses nothing: a thread with an OpenMP team of its own is not, since the
        // watchdog finds a stuck forward's team by the name the team inherited.
        let lane = (model.device().is_cuda() && mode.intra_op_threads == 1).then(|| Lane {
            device: runtime::device_name(model.device()),
            grad: mode.grad,
        });
        for i in 0..threads {
            let (queue, model, shared) = (queue.clone(), model.clone(), shared.clone());
            // Unique per model (the watchdog finds a stuck forward's OpenMP workers by it;
            // they inherit it), readable in top: `f<model#>.<worker#>-<name>`, 15 bytes max.
            let thread_name: String = format!("f{seq}.{i}-{name}").chars().take(15).collect();
            // On failure `engine` is dropped, closing the queue: threads already started stop
            // serving it.
            start_worker(
                lane.clone(),
                thread_name,
                name,
                Box::new(move || {
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() };
                    runtime::prepare_forward_thread(mode);
                    let key = |input: &Arc<PipelineInput>| input.batch_key;
                    // While no request waits (from the start, then after each batch, until
                    // the model is quarantined): CUDA graphs for the input shapes just seen,
                    // then the model's warm-up steps, one at a time. Both run the model's
                    // code: the watchdog quarantines the model if one runs past `idle_limit`
                    // (the model's response timeout, lowered to its tenant's).
                    let idle_work = || {
                        while queue.depth() == 0
                            && !queue.is_closed()
                            && !shared.quarantined.load(Ordering::SeqCst)
                        {
                            // The watchdog acts `grace` past a deadline: this one is set so
                            // that it acts once the piece has run `idle_limit`.
                            let now = Instant::now();
                            let deadline = (now + idle_limit.min(shared.grace))
                                .checked_sub(shared.grace)
                                .unwrap_or(now);
                            shared.set_busy(i, Some(Busy { deadline, tid }));
                            let ran =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    model.background_step(&shared.name)
                                }))
                                .unwrap_or(false);
                            shared.set_busy(i, None);
                            if !ran && model.pending_captures() > 0 {
                                // Another model's capture holds the process's one capture
                                // slot: try again shortly (a request arriving meanwhile goes
                                // first).
                                std::thread::sleep(Duration::from_millis(5));
                            } else if !ran {
                                break;
                            }
                        }
                    };
                    idle_work();
                    while let Some(jobs) = queue.take_batch(batching.max, batching.delay, key) {
                        if jobs.is_empty() {
                            // Nudged: work between requests is waiting.
                            idle_work();
                            continue;
                        }
                        // The watchdog measures overruns from the latest deadline: the
                        // forward still serves someone until then.
                        let deadline = jobs.iter().map(|j| j.deadline).max().expect("a job");
                        shared.set_busy(i, Some(Busy { deadline, tid }));
                        let queued: Vec<Duration> = jobs.iter().map(|j| j.waited()).collect();
                        runtime::set_thread_deadline(Some(deadline));
                        let results = run_batch(&model, &jobs);
                        runtime::set_thread_deadline(None);
                        shared.set_busy(i, None);
                        for ((job, (result, batch)), queued) in
                            jobs.into_iter().zip(results).zip(queued)
                        {
                            job.answer(Reply {
                                result,
                                queued,
                                batch,
                            });
                        }
                        idle_work();
                    }
                    // The model goes with the last thread that lets go of it.
                    drop(model);
                    !shared.quarantined.load(Ordering::SeqCst)
                }),
            )?;
        }
        watch(&shared);
        Ok(engine)
    }

    /// Has an idle worker do the model's work between requests now (CUDA graphs queued while
    /// no request came, after a swap-in).
    pub fn nudge(&self) {
        self.queue.nudge();
    }

    /// Stops taking requests: the workers finish what is queued, then stop serving the model
    /// (they exit, or park for the next engine; [`join_all`] at shutdown).
    pub fn close(&self) {
        self.queue.close();
    }

    /// A slot for one request (held from preprocess to postprocess), or `Full` (429).
    pub fn admit(&self) -> Result<Slot, queue::Full> {
        self.queue.admit()
    }

    /// Its forward threads.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Jobs waiting for a forward thread.
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    /// Requests holding a slot (their work, or a gone client's, not finished).
    pub fn admitted(&self) -> usize {
        self.queue.admitted()
    }

    /// Runs one forward (alone or in a batch) under `slot` on the next free worker; returns
    /// its [`Reply`]. `deadline` is the request's: a job still queued past it is dropped, and the
    /// watchdog measures overruns from it.
    pub async fn forward(
        &self,
        slot: &Slot,
        input: Arc<PipelineInput>,
        deadline: Instant,
    ) -> Result<Reply, NotRun> {
        let rx = self.queue.submit(slot, input, deadline)?;
        rx.await.map_err(|_| queue::not_run(deadline))
    }
}

/// One forward for `jobs` (a batch when there are several): each job's result and the
/// number of requests in the forward that served it (see [`Pipeline::forward_batch`] for what
/// happens when a batched forward fails).
fn run_batch(
    model: &Pipeline,
    jobs: &[queue::Job<Arc<PipelineInput>, Reply>],
) -> Vec<(Outcome, usize)> {
    // Its weights stay on the device until the forward ends.
    let _serving = match model.serving() {
        Ok(guard) => guard,
        Err(e) => return jobs.iter().map(|_| (Err(e.clone()), 1)).collect(),
    };
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let [job] = jobs {
            return vec![(model.forward(&job.input), 1)];
        }
        let inputs: Vec<&PipelineInput> = jobs.iter().map(|j| &*j.input).collect();
        model.forward_batch(&inputs)
    }));
    out.unwrap_or_else(|_| {
        let failed = || Err(RuntimeError::Forward("forward panicked".into()));
        jobs.iter().map(|_| (failed(), jobs.len())).collect()
    })
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.queue.close();
    }
}

impl Shared {
    fn set_busy(&self, i: usize, state: Option<Busy>) {
        if let Ok(mut busy) = self.busy.lock() {
            busy[i] = state;
        }
    }

    /// Quarantines the model if a forward overran; demotes each overrunning thread once.
    fn check(&self, now: Instant) {
        // Under the lock: a thread clears its slot when its forward ends, so one demoted here is
        // still in that forward, and it finds the model quarantined (not to be lent again)
        // once it gets out.
        let Ok(mut busy) = self.busy.lock() else {
            return;
        };
        let overdue: Vec<(usize, Busy)> = busy
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.filter(|b| now > b.deadline + self.grace).map(|b| (i, b)))
            .collect();
        if overdue.is_empty() {
            return;
        }
        let first = !self.quarantined.swap(true, Ordering::SeqCst);
        for (i, b) in overdue {
            demote(b.tid);
            // Forget the slot so the thread is demoted once; it stays busy in its forward.
            busy[i] = None;
            tracing::error!(
                model = self.name,
                thread = b.tid,
                overrun_s = (now - b.deadline).as_secs(),
                "a forward ran past its deadline by more than responseTimeout: model quarantined \
                 (503 until unloaded or replaced), its thread moved to idle priority"
            );
        }
        drop(busy);
        if first {
            (self.on_quarantine)();
        }
    }
}

/// Moves thread `tid`, and the OpenMP workers it started (they inherit its name), to the idle
/// scheduling class at the lowest priority.
fn demote(tid: libc::pid_t) {
    let comm =
        |t: &str| std::fs::read_to_string(format!("/proc/self/task/{t}/comm")).unwrap_or_default();
    let name = comm(&tid.to_string());
    let mut tids = vec![tid];
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let t = t.file_name().to_string_lossy().into_owned();
            if let Ok(other) = t.parse::<libc::pid_t>() {
                if other != tid && !name.is_empty() && comm(&t) == name {
                    tids.push(other);
                }
            }
        }
    }
    for t in tids {
        // SAFETY: plain syscalls on one of this process's threads, with a zeroed param struct.
        unsafe {
            let param = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(t, libc::SCHED_IDLE, &param) != 0 {
                tracing::warn!(
                    thread = t,
                    "could not move a stuck forward to SCHED_IDLE: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::setpriority(libc::PRIO_PROCESS, t as libc::id_t, 19);
        }
    }
}

/// Registers a model's workers with the process-wide watchdog thread (started on first use).
fn watch(shared: &Arc<Shared>) {
    static WATCHED: OnceLock<Mutex<Vec<Weak<Shared>>>> = OnceLock::new();
    let mut started = false;
    let list = WATCHED.get_or_init(|| {
        started = true;
        Mutex::new(Vec::new())
    });
    if let Ok(mut l) = list.lock() {
        l.retain(|w| w.strong_count() > 0);
        l.push(Arc::downgrade(shared));
    }
    if started {
        let spawned = std::thread::Builder::new()
            .name("fwd-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                let alive: Vec<Arc<Shared>> = match list.lock() {
                    Ok(l) => l.iter().filter_map(Weak::upgrade).collect(),
                    Err(_) => return,
                };
                let now = Instant::now();
                for s in alive {
                    s.check(now);
                }
            });
        if let Err(e) = spawned {
            tracing::error!("could not start the forward watchdog: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn lane(device: &str) -> Option<Lane> {
        Some(Lane {
            device: device.into(),
            grad: runtime::GradMode::Inference,
        })
    }

    fn parked_in(lane: &Option<Lane>) -> usize {
        parked()
            .0
            .iter()
            .filter(|t| Some(&t.lane) == lane.as_ref())
            .count()
    }

    /// Runs a job for `model` on a worker of `lane`; the thread it ran on, once the thread is
    /// done with it.
    fn run_for(lane: &Option<Lane>, model: &str, reusable: bool) -> std::thread::ThreadId {
        let (tx, rx) = mpsc::channel();
        let before = parked_in(lane);
        start_worker(
            lane.clone(),
            "f-test".into(),
            model,
            Box::new(move || {
                tx.send(std::thread::current().id()).unwrap();
                reusable
            }),
        )
        .unwrap();
        let id = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        if reusable && lane.is_some() {
            let parked = Instant::now();
            while parked_in(lane) <= before.saturating_sub(1) && parked.elapsed().as_secs() < 10 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        id
    }

    fn run_on(lane: &Option<Lane>, reusable: bool) -> std::thread::ThreadId {
        run_for(lane, "m", reusable)
    }

    /// A thread whose engine ended serves the next engine of its lane (and keeps its per-thread
    /// state); one of another lane, one without a lane, or one whose model was quarantined is
    /// not lent again.
    #[test]
    fn forward_threads_are_lent_within_their_lane() {
        let (a, b) = (lane("test-lane-a"), lane("test-lane-b"));
        let first = run_on(&a, true);
        assert_eq!(parked_in(&a), 1);
        assert_eq!(
            run_on(&a, true),
            first,
            "the parked thread served the next engine"
        );
        assert_ne!(run_on(&b, true), first, "another lane gets its own thread");
        assert_eq!(parked_in(&b), 1);
        // The thread is not parked again once its model was quarantined.
        assert_eq!(run_on(&a, false), first);
        assert_eq!(parked_in(&a), 0);
        assert_ne!(run_on(&a, true), first);
        // Without a lane (a CPU model, or one with an OpenMP team), threads exit.
        let none = run_on(&None, true);
        assert_ne!(run_on(&None, true), none);
    }

    /// A reload goes back to a thread that served the same model, when one is parked; a parked
    /// thread holds nothing of the model it served.
    #[test]
    fn a_model_gets_back_the_thread_that_served_it() {
        let lane = lane("test-lane-affinity");
        let first = run_for(&lane, "a", true);
        // The parked thread serves "b" (the only one of the lane) while "c" gets a new thread.
        let (tx, rx) = mpsc::channel::<()>();
        let held = Arc::new(());
        let in_work = held.clone();
        start_worker(
            lane.clone(),
            "f-test".into(),
            "b",
            Box::new(move || {
                let _model = in_work;
                rx.recv().is_ok()
            }),
        )
        .unwrap();
        let second = run_for(&lane, "c", true);
        assert_ne!(
            second, first,
            "the lane's only parked thread was busy with b"
        );
        tx.send(()).unwrap();
        let started = Instant::now();
        while (Arc::strong_count(&held) > 1 || parked_in(&lane) < 2)
            && started.elapsed().as_secs() < 10
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "the parked thread let go of its model"
        );
        // Two parked: the first last served b, the second c; each goes back to its model.
        assert_eq!(run_for(&lane, "c", true), second);
        assert_eq!(run_for(&lane, "b", true), first);
    }
}
