//! [`Progress`]: where a trainer's update stands, for the observers every trainer engine
//! accepts (`set_progress`), and the bookkeeping engines share to report it.

/// Where a trainer's update stands. An observer hears it once when the payload of an update
/// starts (`messages == 0`, after the announcement and the vote) and again after every
/// payload message: one per parameter or per chunk on the host engine; one per grouped
/// broadcast, per packed chunk, or for a whole sparse update on the NCCL engine; one per
/// chunk on the CUDA-IPC engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Session number (from 1).
    pub session: u64,
    /// Update number within the session (from 0).
    pub update: u32,
    /// Payload messages of this update handed to every worker so far.
    pub messages: usize,
    /// Payload bytes of this update sent to each worker so far.
    pub bytes: usize,
    /// Payload bytes of the whole update, per worker.
    pub total_bytes: usize,
}

/// A progress observer, as engines keep it.
pub(crate) type Observer = Box<dyn FnMut(&Progress) + Send>;

/// The progress of one update's payload.
#[derive(Debug)]
pub(crate) struct Tracker {
    progress: Progress,
}

impl Tracker {
    /// Starts tracking update `update` of session `session` (`total_bytes` of payload per
    /// worker) and reports the start to `observer`.
    pub(crate) fn start(
        observer: &mut Option<Observer>,
        session: u64,
        update: u32,
        total_bytes: usize,
    ) -> Self {
        let tracker = Self {
            progress: Progress {
                session,
                update,
                messages: 0,
                bytes: 0,
                total_bytes,
            },
        };
        tracker.report(observer);
        tracker
    }

    /// Counts one more payload message of `bytes` bytes and reports it.
    pub(crate) fn step(&mut self, observer: &mut Option<Observer>, bytes: usize) {
        self.progress.messages += 1;
        self.progress.bytes += bytes;
        self.report(observer);
    }

    /// Payload bytes sent so far.
    pub(crate) fn bytes(&self) -> usize {
        self.progress.bytes
    }

    fn report(&self, observer: &mut Option<Observer>) {
        if let Some(observer) = observer.as_mut() {
            observer(&self.progress);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn start_and_steps_are_reported_in_order() {
        let seen: Arc<Mutex<Vec<(usize, usize)>>> = Arc::default();
        let sink = Arc::clone(&seen);
        let mut observer: Option<Observer> = Some(Box::new(move |p: &Progress| {
            assert_eq!((p.session, p.update, p.total_bytes), (3, 1, 30));
            sink.lock().unwrap().push((p.messages, p.bytes));
        }));
        let mut t = Tracker::start(&mut observer, 3, 1, 30);
        t.step(&mut observer, 10);
        t.step(&mut observer, 20);
        assert_eq!(t.bytes(), 30);
        assert_eq!(*seen.lock().unwrap(), vec![(0, 0), (1, 10), (2, 30)]);

        // No observer: counting still works.
        let mut none: Option<Observer> = None;
        let mut t = Tracker::start(&mut none, 1, 0, 5);
        t.step(&mut none, 5);
        assert_eq!(t.bytes(), 5);
    }
}
