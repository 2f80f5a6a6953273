//! Fair dispatch of events to the worker threads. Events are queued per
//! remote, and one remote may hold at most `cap` workers at once: a remote
//! that hangs or trickles ties up only its share, and events of other
//! remotes (other domains, ready ranges of healthy blobs) are still taken
//! at once by the workers it cannot have.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};

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
}
