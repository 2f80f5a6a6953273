//! The one pool of worker threads that serves every frontend's reads
//! (fanotify events, cachefiles READs, FUSE reads that miss).
//!
//! Fair by remote: jobs are queued per key (the remote a read fetches
//! from), and one key may hold at most all workers but two at once, so a
//! remote that hangs or trickles ties up only its share, and reads of other
//! remotes (other domains, ready ranges of healthy blobs) are still taken at
//! once by the workers it cannot have. One pool rather than one per
//! frontend keeps the daemon's thread count fixed however many mounts and
//! frontends it serves, and gives every frontend the same fairness.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

/// A unit of work: one read to serve.
pub type Job = Box<dyn FnOnce() + Send>;

/// Worker threads taking [`Job`]s fairly by key.
pub struct WorkerPool {
    queue: Arc<FairQueue<Job>>,
    threads: usize,
}

impl WorkerPool {
    /// `threads` workers named `{name}-{i}`; one key may hold all but two
    /// of them (at least one).
    pub fn new(name: &str, threads: usize) -> std::io::Result<Arc<WorkerPool>> {
        let threads = threads.max(1);
        let queue = Arc::new(FairQueue::new(threads.saturating_sub(2)));
        for i in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || work(&queue))?;
        }
        Ok(Arc::new(WorkerPool { queue, threads }))
    }

    /// Run `job` on a worker, fairly among the jobs of other keys.
    pub fn submit(&self, key: String, job: impl FnOnce() + Send + 'static) {
        self.queue.push(key, Box::new(job));
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// The workers end once the last handle on the pool is gone and the
/// queue has drained.
impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// A worker's loop. A panicking job is logged and its slot given back (by
/// the guard), so one bad read never shrinks the pool or starves its key.
fn work(queue: &FairQueue<Job>) {
    struct Slot<'a>(&'a FairQueue<Job>, String);
    impl Drop for Slot<'_> {
        fn drop(&mut self) {
            self.0.done(&self.1);
        }
    }
    while let Some((key, job)) = queue.pop() {
        let _slot = Slot(queue, key);
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
            tracing::error!(key = %_slot.1, "a read job panicked");
        }
    }
}

pub(crate) struct FairQueue<T> {
    state: Mutex<State<T>>,
    cv: Condvar,
    cap: usize,
}

struct State<T> {
    queues: HashMap<String, VecDeque<T>>,
    /// Keys in round-robin order.
    ring: VecDeque<String>,
    busy: HashMap<String, usize>,
    closed: bool,
}

impl<T> FairQueue<T> {
    pub fn new(cap: usize) -> Self {
        FairQueue {
            state: Mutex::new(State {
                queues: HashMap::new(),
                ring: VecDeque::new(),
                busy: HashMap::new(),
                closed: false,
            }),
            cv: Condvar::new(),
            cap: cap.max(1),
        }
    }

    pub fn push(&self, key: String, item: T) {
        let mut st = self.state.lock().unwrap();
        if !st.queues.contains_key(&key) {
            st.ring.push_back(key.clone());
        }
        st.queues.entry(key).or_default().push_back(item);
        drop(st);
        self.cv.notify_one();
    }

    /// The next item of the first key in turn that is under its cap;
    /// blocks until there is one. `None` once closed and drained.
    pub fn pop(&self) -> Option<(String, T)> {
        let mut st = self.state.lock().unwrap();
        loop {
            let cap = self.cap;
            let pick = st.ring.iter().position(|k| {
                st.busy.get(k).copied().unwrap_or(0) < cap
                    && st.queues.get(k).is_some_and(|q| !q.is_empty())
            });
            if let Some(i) = pick {
                let key = st.ring.remove(i).unwrap();
                let item = st.queues.get_mut(&key).unwrap().pop_front().unwrap();
                if st.queues[&key].is_empty() {
                    st.queues.remove(&key);
                } else {
                    st.ring.push_back(key.clone());
                }
                *st.busy.entry(key.clone()).or_default() += 1;
                return Some((key, item));
            }
            if st.closed && st.queues.is_empty() {
                return None;
            }
            st = self.cv.wait(st).unwrap();
        }
    }

    /// A worker finished an item of `key`.
    pub fn done(&self, key: &str) {
        let mut st = self.state.lock().unwrap();
        if let Some(n) = st.busy.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                st.busy.remove(key);
            }
        }
        drop(st);
        self.cv.notify_all();
    }

    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_key_leaves_workers_to_the_others() {
        let q = FairQueue::new(2);
        for i in 0..10 {
            q.push("slow".into(), i);
        }
        q.push("fast".into(), 100);
        // Two workers take slow's items and hang on them...
        assert_eq!(q.pop().unwrap(), ("slow".into(), 0));
        assert_eq!(q.pop().unwrap(), ("fast".into(), 100));
        assert_eq!(q.pop().unwrap(), ("slow".into(), 1));
        // ...slow is at its cap: a new key's item is next, not slow's.
        q.push("other".into(), 200);
        assert_eq!(q.pop().unwrap(), ("other".into(), 200));
        q.done("slow");
        assert_eq!(q.pop().unwrap(), ("slow".into(), 2));
        // Closed: the rest drains, one slot at a time as workers finish.
        q.close();
        let mut rest = Vec::new();
        loop {
            q.done("slow");
            match q.pop() {
                Some((_, i)) => rest.push(i),
                None => break,
            }
        }
        assert_eq!(rest, (3..10).collect::<Vec<_>>());
    }

    /// A key whose jobs hang holds all workers but two; the others' jobs
    /// still run, and a panicking job gives its worker back.
    #[test]
    fn a_hung_key_leaves_the_pool_to_the_others() {
        use std::sync::mpsc;
        use std::time::Duration;
        let pool = WorkerPool::new("test", 4).unwrap();
        let (release, hang) = mpsc::channel::<()>();
        let hang = Arc::new(Mutex::new(hang));
        for _ in 0..6 {
            let hang = hang.clone();
            pool.submit("hung".into(), move || {
                let _ = hang.lock().unwrap().recv();
            });
        }
        let (tx, rx) = mpsc::channel();
        for i in 0..3 {
            let tx = tx.clone();
            pool.submit("ok".into(), move || {
                if i == 0 {
                    panic!("a bad read");
                }
                tx.send(i).unwrap();
            });
        }
        let mut got: Vec<i32> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, [1, 2]);
        for _ in 0..6 {
            release.send(()).unwrap();
        }
    }
}
