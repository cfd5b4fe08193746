//! The scheduler's clock: unix milliseconds that advance with tokio's clock, so that TTL, idle and
//! prune timelines can be tested under `#[tokio::test(start_paused = true)]`.

use tokio::time::Instant;

/// Unix milliseconds anchored once to the system clock and advanced by tokio's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_instant: Instant,
    base_ms: u64,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock reading the system time now.
    pub fn new() -> Self {
        Self {
            base_instant: Instant::now(),
            base_ms: hearth_messages::now_ms(),
        }
    }

    /// Now, as unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.base_ms + self.base_instant.elapsed().as_millis() as u64
    }
}
