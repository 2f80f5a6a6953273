//! Single flight: however many readers miss a chunk at once, one of them
//! (the leader) fetches it and the others wait for its result. A waiter
//! never waits longer than a fetch may take, and a leader that goes away
//! without landing its flight (see `cache::Claim`'s drop guard) ends it
//! with [`FlightError::Abandoned`], so no waiter is left blocked.

use crate::error::FlightError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a reader waits on another's fetch unless told otherwise.
const DEFAULT_WAIT: Duration = Duration::from_secs(90);

/// One in-progress fetch; concurrent readers of the same chunk wait on it.
#[derive(Default)]
pub(crate) struct Flight {
    done: Mutex<Option<Result<(), FlightError>>>,
    cv: Condvar,
}

impl Flight {
    /// The leader's result, or an error once `max` has passed: a waiter
    /// never waits on a stuck flight longer than a fetch may take.
    pub(crate) fn wait(&self, max: Duration) -> Result<(), FlightError> {
        let until = Instant::now() + max;
        let mut done = self.done.lock().unwrap();
        while done.is_none() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FlightError::TimedOut { after: max });
            }
            done = self.cv.wait_timeout(done, left).unwrap().0;
        }
        done.clone().expect("checked above")
    }
}

/// The flights of one blob, keyed by the chunk's first block.
pub(crate) struct Flights {
    map: Mutex<HashMap<u32, Arc<Flight>>>,
    /// Milliseconds a reader waits on another's fetch.
    wait_ms: AtomicU64,
}

impl Default for Flights {
    fn default() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
            wait_ms: AtomicU64::new(DEFAULT_WAIT.as_millis() as u64),
        }
    }
}

/// The flight table, locked: joining and leading happen under one lock, so
/// two readers never both lead a chunk.
pub(crate) struct Table<'a>(MutexGuard<'a, HashMap<u32, Arc<Flight>>>);

impl Table<'_> {
    /// The flight already fetching the chunk at `key`, if any.
    pub(crate) fn joining(&self, key: u32) -> Option<Arc<Flight>> {
        self.0.get(&key).cloned()
    }

    /// A new flight for the chunk at `key`, led by the caller.
    pub(crate) fn lead(&mut self, key: u32) -> Arc<Flight> {
        let f = Arc::new(Flight::default());
        self.0.insert(key, f.clone());
        f
    }
}

impl Flights {
    pub(crate) fn table(&self) -> Table<'_> {
        Table(self.map.lock().unwrap())
    }

    /// Retire the flight at `key` and wake its waiters with `result`.
    pub(crate) fn land(&self, key: u32, flight: &Flight, result: Result<(), FlightError>) {
        self.map.lock().unwrap().remove(&key);
        *flight.done.lock().unwrap() = Some(result);
        flight.cv.notify_all();
    }

    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    /// Bound how long readers wait on another reader's fetch.
    pub(crate) fn set_wait(&self, max: Duration) {
        self.wait_ms
            .store(max.as_millis() as u64, Ordering::Relaxed);
    }

    pub(crate) fn wait_limit(&self) -> Duration {
        Duration::from_millis(self.wait_ms.load(Ordering::Relaxed))
    }
}
