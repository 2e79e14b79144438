//! A model's request queue: bounded admission, first in first out (a batch takes the later jobs
//! that batch with its first ahead of others), and no device time for work nobody waits for.
//!
//! A request takes a [`Slot`] when it arrives ([`Queue::admit`]); with every slot taken the
//! answer is "full" (429), at once. The slot is held, by the request and by each job it
//! submits, until the last of them is gone: a client that disconnects, or a request that
//! already answered 504, keeps its slot until its work has really stopped, so abandoned work
//! cannot pile up beyond the bound. Workers [`take_batch`](Queue::take_batch) the oldest job
//! and those queued with the same batch key; a job whose requester has gone or whose deadline
//! has passed is dropped there, before it reaches the device.
//!
//! Workers are plain threads (libtorch calls block), so waiting is a condition variable, not a
//! future; requesters wait on a oneshot.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The queue of one model. `I` is a job's input, `R` its answer.
pub struct Queue<I, R> {
    state: Mutex<State<I, R>>,
    ready: Condvar,
    capacity: usize,
}

struct State<I, R> {
    jobs: VecDeque<Job<I, R>>,
    /// Slots held (admitted requests whose work is not finished).
    admitted: usize,
    /// Admitted requests that have not submitted a job yet (in their preprocess): a batch
    /// waits for them, not for requests that may never come.
    preparing: usize,
    closed: bool,
    /// [`Queue::nudge`] was called: one waiting worker returns an empty batch.
    nudged: bool,
}

/// Every slot is taken: the request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Why a submitted job got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRun {
    /// The queue is closed (its model is being unloaded).
    Closed,
    /// Its deadline passed before a worker took it.
    Expired,
}

/// A request's admission. Clones share it; it is given back when the last clone is dropped.
pub struct Slot<I, R>(Arc<SlotInner<I, R>>);

struct SlotInner<I, R> {
    queue: Arc<Queue<I, R>>,
    submitted: AtomicBool,
}

impl<I, R> Clone for Slot<I, R> {
    fn clone(&self) -> Self {
        Slot(self.0.clone())
    }
}

impl<I, R> Drop for SlotInner<I, R> {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.admitted -= 1;
        if !*self.submitted.get_mut() {
            // A request that gave up before submitting: a filling batch stops waiting for it.
            state.preparing -= 1;
            drop(state);
            self.queue.ready.notify_all();
        }
    }
}

/// One unit of work for a worker.
pub struct Job<I, R> {
    pub input: I,
    pub deadline: Instant,
    enqueued: Instant,
    reply: oneshot::Sender<R>,
    _slot: Slot<I, R>,
}

impl<I, R> Job<I, R> {
    /// How long it waited for a worker (until now).
    pub fn waited(&self) -> Duration {
        self.enqueued.elapsed()
    }

    /// Answers the requester (if it still waits) and gives back the job's hold on the slot.
    pub fn answer(self, result: R) {
        let _ = self.reply.send(result);
    }

    fn live(&self, now: Instant) -> bool {
        !self.reply.is_closed() && now < self.deadline
    }
}

impl<I, R> Queue<I, R> {
    /// A queue admitting at most `capacity` requests at once.
    pub fn new(capacity: usize) -> Arc<Queue<I, R>> {
        Arc::new(Queue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                admitted: 0,
                preparing: 0,
                closed: false,
                nudged: false,
            }),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<I, R>> {
        // Nothing panics while holding the lock; a poisoned lock still has a consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one request, or [`Full`] when `capacity` requests hold one.
    pub fn admit(self: &Arc<Self>) -> Result<Slot<I, R>, Full> {
        let mut state = self.lock();
        if state.admitted >= self.capacity {
            return Err(Full);
        }
        state.admitted += 1;
        state.preparing += 1;
        Ok(Slot(Arc::new(SlotInner {
            queue: self.clone(),
            submitted: AtomicBool::new(false),
        })))
    }

    /// Requests admitted and not finished.
    pub fn admitted(&self) -> usize {
        self.lock().admitted
    }

    /// Jobs waiting for a worker.
    pub fn depth(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Queues `input` under `slot`, to run before `deadline`; the answer comes on the receiver
    /// (which errors if the job is dropped unanswered: see [`Queue::take`]).
    pub fn submit(
        &self,
        slot: &Slot<I, R>,
        input: I,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<R>, NotRun> {
        let (reply, rx) = oneshot::channel();
        let mut state = self.lock();
        if state.closed {
            return Err(NotRun::Closed);
        }
        if !slot.0.submitted.swap(true, Ordering::Relaxed) {
            state.preparing -= 1;
        }
        state.jobs.push_back(Job {
            input,
            deadline,
            enqueued: Instant::now(),
            reply,
            _slot: slot.clone(),
        });
        drop(state);
        // All: a worker filling a batch waits here too, beside idle ones.
        self.ready.notify_all();
        Ok(rx)
    }

    /// Blocks until at least one live job waits, then takes up to `max` of them in order. Jobs
    /// whose requester has gone or whose deadline has passed are dropped on the way (their
    /// slots given back). `None` once the queue is closed and empty; an empty batch when
    /// nudged ([`Queue::nudge`]) with nothing queued.
    pub fn take(&self, max: usize) -> Option<Vec<Job<I, R>>> {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            let mut taken = Vec::new();
            let mut dropped = Vec::new();
            while taken.len() < max.max(1) {
                let Some(job) = state.jobs.pop_front() else {
                    break;
                };
                if job.live(now) {
                    taken.push(job);
                } else {
                    dropped.push(job);
                }
            }
            if !dropped.is_empty() {
                // Slots lock the queue when released: drop them outside the lock.
                drop(state);
                drop(dropped);
                if !taken.is_empty() {
                    return Some(taken);
                }
                state = self.lock();
                continue;
            }
            if !taken.is_empty() {
                return Some(taken);
            }
            if state.closed {
                return None;
            }
            if std::mem::take(&mut state.nudged) {
                return Some(taken);
            }
            state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Wakes a worker waiting for jobs with an empty batch (so that it does its work between
    /// requests, such as CUDA graphs queued after a swap-in).
    pub fn nudge(&self) {
        self.lock().nudged = true;
        self.ready.notify_all();
    }

    /// A batch: blocks until a live job waits and takes it, then gathers the queued jobs whose
    /// `key` equals its (in order, up to `max` jobs in all; jobs with another key stay queued
    /// for a later batch), waiting at most `delay` from the first job's taking for the batch to
    /// fill — and only while admitted requests are still in their preprocess (a lone client
    /// does not wait `delay` for requests nobody has sent). A job whose key is `None` goes
    /// alone. Jobs gone or expired are dropped on the way. `None` once the queue is closed and
    /// empty.
    pub fn take_batch<K: PartialEq>(
        &self,
        max: usize,
        delay: Duration,
        key: impl Fn(&I) -> Option<K>,
    ) -> Option<Vec<Job<I, R>>> {
        let mut batch = self.take(1)?;
        if max <= 1 || batch.is_empty() {
            return Some(batch);
        }
        let Some(want) = key(&batch[0].input) else {
            return Some(batch);
        };
        let until = Instant::now() + delay;
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            let mut dropped = Vec::new();
            let mut i = 0;
            while i < state.jobs.len() && batch.len() < max {
                let job = &state.jobs[i];
                if !job.live(now) {
                    dropped.extend(state.jobs.remove(i));
                } else if key(&job.input).as_ref() == Some(&want) {
                    batch.extend(state.jobs.remove(i));
                } else {
                    i += 1;
                }
            }
            if !dropped.is_empty() {
                drop(state);
                drop(dropped);
                state = self.lock();
                continue;
            }
            if batch.len() >= max || state.closed || now >= until || state.preparing == 0 {
                // Jobs whose requester left, or whose deadline passed, while the batch filled
                // do not run.
                let (live, gone): (Vec<_>, Vec<_>) =
                    batch.into_iter().partition(|j| j.live(Instant::now()));
                drop(state);
                drop(gone);
                if live.is_empty() {
                    return self.take_batch(max, delay, key);
                }
                return Some(live);
            }
            state = self
                .ready
                .wait_timeout(state, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Whether [`Queue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Refuses new jobs and wakes every waiting worker; jobs already queued still run.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// What a dropped job's requester sees: [`NotRun::Expired`] past its deadline, else
/// [`NotRun::Closed`].
pub fn not_run(deadline: Instant) -> NotRun {
    if Instant::now() >= deadline {
        NotRun::Expired
    } else {
        NotRun::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn admission_is_bounded_and_slots_come_back() {
        let q: Arc<Queue<u32, u32>> = Queue::new(2);
        let a = q.admit().unwrap();
        let b = q.admit().unwrap();
        assert_eq!(q.admit().err(), Some(Full));
        let a2 = a.clone();
        drop(a);
        // A clone (a queued job's, say) still holds the slot.
        assert_eq!(q.admit().err(), Some(Full));
        drop(a2);
        let c = q.admit().unwrap();
        assert_eq!(q.admitted(), 2);
        drop((b, c));
        assert_eq!(q.admitted(), 0);
    }

    #[test]
    fn jobs_run_in_order_and_are_taken_up_to_max() {
        let q: Arc<Queue<u32, u32>> = Queue::new(8);
        let slot = q.admit().unwrap();
        let mut replies: Vec<_> = (0..5)
            .map(|i| q.submit(&slot, i, later()).unwrap())
            .collect();
        assert_eq!(q.depth(), 5);
        let first = q.take(2).unwrap();
        assert_eq!(first.iter().map(|j| j.input).collect::<Vec<_>>(), [0, 1]);
        let rest = q.take(10).unwrap();
        assert_eq!(rest.iter().map(|j| j.input).collect::<Vec<_>>(), [2, 3, 4]);
        for job in first.into_iter().chain(rest) {
            let v = job.input * 10;
            job.answer(v);
        }
        for (i, rx) in replies.iter_mut().enumerate() {
            assert_eq!(rx.try_recv().unwrap(), i as u32 * 10);
        }
    }

    /// A nudge wakes one waiting worker with an empty batch, once; queued jobs go first.
    #[test]
    fn a_nudge_wakes_a_waiting_worker_with_an_empty_batch() {
        let q: Arc<Queue<u32, u32>> = Queue::new(8);
        let waiting = {
            let q = q.clone();
            std::thread::spawn(move || q.take_batch(4, Duration::from_secs(60), |_| Some(0)))
        };
        std::thread::sleep(Duration::from_millis(50));
        q.nudge();
        assert_eq!(waiting.join().unwrap().map(|b| b.len()), Some(0));
        // A job queued after a nudge is taken, not an empty batch.
        q.nudge();
        let slot = q.admit().unwrap();
        let _rx = q.submit(&slot, 7, later()).unwrap();
        let batch = q.take(4).unwrap();
        assert_eq!(batch.iter().map(|j| j.input).collect::<Vec<_>>(), [7]);
        // The nudge is still there for the next call that finds the queue empty.
        assert_eq!(q.take(4).map(|b| b.len()), Some(0));
        q.close();
        assert!(q.take(4).is_none());
    }

    #[test]
    fn abandoned_and_expired_jobs_never_reach_a_worker_and_hold_their_slot_until_dropped() {
        let q: Arc<Queue<&str, ()>> = Queue::new(3);
        let gone = q.admit().unwrap();
        let gone_rx = q.submit(&gone, "client gone", later()).unwrap();
        let late = q.admit().unwrap();
        let late_rx = q
            .submit(&late, "expired", Instant::now() - Duration::from_millis(1))
            .unwrap();
        let ok = q.admit().unwrap();
        let _ok_rx = q.submit(&ok, "live", later()).unwrap();
        // The requesters go away (the client disconnected; the request answered 504).
        drop((gone, gone_rx, late));
        // Their jobs still hold their slots: nothing new fits yet.
        assert_eq!(q.admit().err(), Some(Full));
        let taken = q.take(10).unwrap();
        assert_eq!(taken.iter().map(|j| j.input).collect::<Vec<_>>(), ["live"]);
        // Dropping them at the queue gave both slots back.
        assert_eq!(q.admitted(), 1);
        // The expired job's requester learns it did not run.
        let mut late_rx = late_rx;
        assert!(late_rx.try_recv().is_err());
    }

    #[test]
    fn batches_gather_jobs_of_one_key_in_order_up_to_max() {
        let q: Arc<Queue<(char, u32), ()>> = Queue::new(16);
        let slot = q.admit().unwrap();
        let key = |j: &(char, u32)| (j.0 != '-').then_some(j.0);
        let _rx: Vec<_> = [
            ('a', 0),
            ('b', 1),
            ('a', 2),
            ('-', 3),
            ('a', 4),
            ('a', 5),
            ('b', 6),
        ]
        .into_iter()
        .map(|j| q.submit(&slot, j, later()).unwrap())
        .collect();
        let inputs =
            |jobs: Vec<Job<(char, u32), ()>>| jobs.iter().map(|j| j.input.1).collect::<Vec<_>>();
        // Full at max: no waiting; the other key and the unbatchable job keep their places.
        let first = q.take_batch(3, Duration::from_secs(60), key).unwrap();
        assert_eq!(inputs(first), [0, 2, 4]);
        let second = q.take_batch(3, Duration::ZERO, key).unwrap();
        assert_eq!(inputs(second), [1, 6]);
        let alone = q.take_batch(3, Duration::from_secs(60), key).unwrap();
        assert_eq!(inputs(alone), [3]);
        let last = q.take_batch(3, Duration::ZERO, key).unwrap();
        assert_eq!(inputs(last), [5]);
        // Max 1 is no batching.
        let _rx2: Vec<_> = (7..9)
            .map(|i| q.submit(&slot, ('a', i), later()).unwrap())
            .collect();
        assert_eq!(
            inputs(q.take_batch(1, Duration::from_secs(60), key).unwrap()),
            [7]
        );
    }

    /// The inputs of the next batch of up to 4 jobs (all of one key), waiting at most `delay`.
    fn next_batch(q: &Queue<u32, ()>, delay: Duration) -> Vec<u32> {
        let batch = q.take_batch(4, delay, |_| Some(())).unwrap();
        batch.iter().map(|j| j.input).collect()
    }

    /// Submits `input` under `slot` from another thread, 50 ms from now, right after `before`.
    fn submit_later(
        q: &Arc<Queue<u32, ()>>,
        slot: Slot<u32, ()>,
        input: u32,
        before: impl FnOnce() + Send + 'static,
    ) -> std::thread::JoinHandle<oneshot::Receiver<()>> {
        let q = q.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            before();
            q.submit(&slot, input, later()).unwrap()
        })
    }

    #[test]
    fn a_batch_waits_for_requests_still_preparing_up_to_the_delay() {
        let q: Arc<Queue<u32, ()>> = Queue::new(8);
        let first = q.admit().unwrap();
        let _first_rx = q.submit(&first, 1, later()).unwrap();
        // Another request is admitted, in its preprocess: the batch waits for its job.
        let second = q.admit().unwrap();
        let late = submit_later(&q, second, 2, || {});
        let batch = next_batch(&q, Duration::from_secs(600));
        let _late_rx = late.join().unwrap();
        assert_eq!(batch, [1, 2]);
        // Nobody preparing: no waiting at all, even with a long delay.
        let _third = q.submit(&first, 3, later()).unwrap();
        let batch = next_batch(&q, Duration::from_secs(600));
        assert_eq!(batch, [3]);
        // A request preparing for long: the delay ends the wait with what there is.
        let stuck = q.admit().unwrap();
        let _fourth = q.submit(&first, 4, later()).unwrap();
        let batch = next_batch(&q, Duration::from_millis(20));
        assert_eq!(batch, [4]);
        drop(stuck);
        // A preparing request that gives up (its preprocess failed) ends the wait too.
        let gives_up = q.admit().unwrap();
        let _fifth = q.submit(&first, 5, later()).unwrap();
        let quitter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(gives_up);
        });
        let batch = next_batch(&q, Duration::from_secs(600));
        quitter.join().unwrap();
        assert_eq!(batch, [5]);
    }

    #[test]
    fn a_job_whose_requester_leaves_during_the_wait_does_not_run() {
        let q: Arc<Queue<u32, ()>> = Queue::new(8);
        let first = q.admit().unwrap();
        let first_rx = q.submit(&first, 1, later()).unwrap();
        let preparing = q.admit().unwrap();
        // The client disconnects while its job waits in the batch.
        let leaver = submit_later(&q, preparing, 2, move || drop(first_rx));
        let batch = next_batch(&q, Duration::from_secs(600));
        let _rx = leaver.join().unwrap();
        assert_eq!(batch, [2]);
    }

    #[test]
    fn jobs_gone_while_a_batch_fills_are_dropped_not_batched() {
        let q: Arc<Queue<u32, ()>> = Queue::new(8);
        let slot = q.admit().unwrap();
        let _a = q.submit(&slot, 1, later()).unwrap();
        let gone = q.submit(&slot, 2, later()).unwrap();
        let _expired = q.submit(&slot, 3, Instant::now() - Duration::from_millis(1));
        let _c = q.submit(&slot, 4, later()).unwrap();
        drop(gone);
        let batch = q.take_batch(8, Duration::ZERO, |_| Some(())).unwrap();
        assert_eq!(batch.iter().map(|j| j.input).collect::<Vec<_>>(), [1, 4]);
        assert_eq!(q.depth(), 0);
    }

    #[test]
    fn closing_wakes_workers_after_the_queued_jobs() {
        let q: Arc<Queue<u32, ()>> = Queue::new(4);
        let slot = q.admit().unwrap();
        let _rx = q.submit(&slot, 7, later()).unwrap();
        let worker = {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while let Some(jobs) = q.take(1) {
                    seen.extend(jobs.iter().map(|j| j.input));
                }
                seen
            })
        };
        // Wait (with a deadline) until the worker has taken the job, then close.
        let until = Instant::now() + Duration::from_secs(10);
        while q.depth() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        q.close();
        assert_eq!(worker.join().unwrap(), [7]);
        assert_eq!(q.submit(&slot, 8, later()).err(), Some(NotRun::Closed));
    }
}
